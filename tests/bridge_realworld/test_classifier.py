"""Presence and style classifiers trained on renders, scored on held-out seeds."""

from __future__ import annotations

import re

import pytest
import torch

from bridge.realworld.classifier import labels_of, render_pool, train_classifier


def test_labels_follow_the_pairs(small_world):
    ids = torch.arange(len(small_world.pairs))
    assert labels_of(small_world, ids, "concept").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert labels_of(small_world, ids, "style").tolist() == [0, 1] * 4
    with pytest.raises(
        ValueError, match=re.escape("`target` must be one of concept, style, got 'colour'.")
    ):
        labels_of(small_world, ids, "colour")


def test_heldout_renders_differ_from_the_training_pool(small_world):
    train, _ = render_pool(small_world, 2, seed=0)
    held, _ = render_pool(small_world, 2, seed=1_000_003)
    assert (train - held).abs().mean() > 0.1


@pytest.mark.parametrize(
    ("target", "chance", "floor"), [("concept", 0.25, 0.75), ("style", 0.5, 0.85)]
)
def test_short_training_beats_chance_on_heldout_seeds(small_world, target, chance, floor):
    # measured 0.92 (concept) and 0.98 (style) on 128 held-out images: binomial sd <= 0.045, so
    # the floors sit > 3 sd below the measurement and far above chance
    report = train_classifier(
        small_world,
        target=target,
        steps=150,
        batch_size=32,
        per_pair=16,
        heldout_per_pair=16,
        width=16,
    )
    assert report.heldout_accuracy > floor > chance
    assert set(report.per_class_accuracy) == set(report.classes)
    probs = report.model.probabilities(render_pool(small_world, 1, seed=5)[0])
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))


def test_heldout_seed_must_differ():
    with pytest.raises(ValueError, match=re.escape("`heldout_seed` must differ from `seed` (3)")):
        train_classifier(None, seed=3, heldout_seed=3)
