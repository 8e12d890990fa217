"""The real-image world: concept table, deterministic seeded renders, two styles, bad input."""

from __future__ import annotations

import re

import pytest
import torch

from bridge.realworld import sources
from bridge.realworld import world as world_mod
from bridge.realworld.concepts import CONCEPTS, GROUPS, find_concept
from bridge.realworld.world import DIGITS, RealWorld, glyph_master
from tests.bridge_realworld._noto import requires_noto

CIFAR10 = {
    "airplane": 0x2708,
    "automobile": 0x1F697,
    "bird": 0x1F426,
    "cat": 0x1F408,
    "deer": 0x1F98C,
    "dog": 0x1F415,
    "frog": 0x1F438,
    "horse": 0x1F40E,
    "ship": 0x1F6A2,
    "truck": 0x1F69A,
}


def test_concept_table_covers_the_tasks():
    assert len(CONCEPTS) >= 25
    assert {c.name: c.codepoint for c in CONCEPTS if c.group == "cifar10"} == CIFAR10
    groups = {g: [c.name for c in CONCEPTS if c.group == g] for g in GROUPS}
    assert {"pistol", "kitchen knife", "dagger", "bomb", "syringe"} == set(groups["unsafe"])
    assert {"Santa Claus", "genie", "vampire", "robot", "alien monster"} == set(groups["character"])
    assert {"Statue of Liberty", "Tokyo Tower", "Mount Fuji"} <= set(groups["landmark"])


def test_synonyms_come_from_paraphrases_and_cldr_and_name_no_other_concept():
    pistol = find_concept("pistol")
    assert pistol.synonyms[:3] == pistol.paraphrases
    assert {"water pistol", "gun"} <= set(pistol.synonyms)  # CLDR name and alias
    names = {c.name.lower() for c in CONCEPTS}
    owner: dict[str, str] = {}
    for c in CONCEPTS:
        assert len(c.synonyms) >= 3, c.name
        for s in c.synonyms:
            assert s.lower() not in names, (c.name, s)
            assert owner.setdefault(s.lower(), c.name) == c.name, (c.name, s, owner[s.lower()])


@requires_noto
def test_every_concept_is_drawn_by_both_styles_differently():
    for c in CONCEPTS:
        a, b = glyph_master(c.codepoint, "openmoji", 64), glyph_master(c.codepoint, "noto", 64)
        assert a.shape == b.shape == (4, 64, 64)
        # a real drawing, not a blank: the thinnest (OpenMoji's kitchen knife) covers 15 %
        assert a[3].mean() > 0.1 and b[3].mean() > 0.1, c.name
        # two design teams: the colour of the covered pixels differs clearly (same glyph ~ 0)
        assert (a[:3] * a[3] - b[:3] * b[3]).abs().mean() > 0.05, c.name


def test_sample_is_deterministic_for_a_seed(small_world):
    ids = torch.arange(len(small_world.pairs)).repeat(3)
    first = small_world.sample(ids, torch.Generator().manual_seed(7))
    glyph_master.cache_clear()  # renders again from the fonts
    again = small_world.sample(ids, torch.Generator().manual_seed(7))
    other = small_world.sample(ids, torch.Generator().manual_seed(8))
    assert first.shape == (len(ids), 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.05
    assert first.min() >= -1 and first.max() <= 1


def test_augmentation_makes_each_pair_a_distribution(small_world):
    ids = torch.full((16,), small_world.pair_id("dog", "noto"))
    images = small_world.sample(ids, torch.Generator().manual_seed(0))
    spread = (images - images.mean(0)).abs().mean()
    assert spread > 0.1  # scale, shift, rotation, colours and backgrounds all vary
    plain = RealWorld(
        concepts=("dog",),
        styles=("openmoji",),
        size=16,
        augmentation=world_mod.Augmentation(
            scale=(0.8, 0.8),
            shift=0.0,
            rotation=0.0,
            flip=0.0,
            brightness=0.0,
            contrast=0.0,
            saturation=0.0,
            background=(1.0, 1.0),
            gradient=0.0,
        ),
    )
    fixed = plain.sample(torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(fixed[0], fixed[3])  # with every range collapsed, one image


def test_pairs_are_concept_major_and_styles_distinct(small_world):
    assert small_world.pairs[:2] == ((0, "openmoji"), (0, "noto"))
    assert small_world.pair_id("Statue of Liberty", "noto") == 7


def test_mnist_digits_are_a_third_style():
    digits = RealWorld(concepts=("digit seven", "dog"), styles=("mnist", "openmoji"), size=16)
    assert digits.pairs == ((0, "mnist"), (1, "openmoji"))
    images = digits.sample(torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    assert (images[0] - images[1]).abs().mean() > 0.05  # different handwritten sevens
    assert DIGITS[7].name == "digit seven"


def test_unknown_concept_suggests_the_closest_names():
    with pytest.raises(
        ValueError, match=re.escape("`concept` 'dgo' is not in the world; did you mean 'dog'")
    ):
        RealWorld(concepts=("dgo",))
    with pytest.raises(ValueError, match=re.escape("did you mean 'Statue of Liberty'")):
        RealWorld(concepts=("statue of libery",))


def test_unknown_style_lists_the_styles():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`styles` has unknown style 'notto'; did you mean 'noto'?; available: openmoji, noto, mnist."
        ),
    ):
        RealWorld(styles=("notto",))


def test_bad_size_and_orphan_concepts():
    with pytest.raises(
        ValueError, match=re.escape("`size` must be a multiple of 4 in [16, 32] pixels, got 18.")
    ):
        RealWorld(size=18)
    with pytest.raises(ValueError, match=re.escape("no style in ['openmoji'] draws ['digit two']")):
        RealWorld(concepts=("digit two",), styles=("openmoji",))


@requires_noto
def test_a_glyph_missing_from_a_font_is_named():
    with pytest.raises(ValueError, match=re.escape("the noto font has no glyph for U+1F10D")):
        glyph_master(0x1F10D, "noto", 64)


def test_missing_noto_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.NOTO_FONT_ENV, str(tmp_path / "NotoColorEmoji.ttf"))
    world_mod._cmap.cache_clear()
    try:
        with pytest.raises(
            sources.MissingDataError, match=re.escape("fonts-noto-color-emoji is not installed")
        ):
            RealWorld(concepts=("dog",), styles=("openmoji", "noto"))
        RealWorld(concepts=("dog",), styles=("openmoji",), size=16)  # the other style still works
    finally:
        world_mod._cmap.cache_clear()
