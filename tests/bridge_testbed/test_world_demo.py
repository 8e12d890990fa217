"""The concept world, the classifier's held-out accuracy, and the demo's caching end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bridge.testbed.classifier import train_classifier
from bridge.testbed.demo import load_demo_config, run_demo
from bridge.testbed.world import ConceptWorld


def test_world_samples_are_deterministic_and_coloured(world):
    a = world.sample(torch.arange(4), torch.Generator().manual_seed(0))
    b = world.sample(torch.arange(4), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 3, 8, 8)
    # the shape's pixels carry the concept's colour: red dominates red concepts, blue blue ones
    for img, concept in zip(a, world.concepts, strict=True):
        fg = img.amax(dim=(1, 2))
        assert fg.argmax().item() == {"red": 0, "blue": 2}[concept.colour]
    with pytest.raises(ValueError, match=re.escape("`colours` has unknown names ['pink']")):
        ConceptWorld(colours=("pink",))
    with pytest.raises(ValueError, match=re.escape("is not a concept of this world")):
        world.concept_id("a pink circle")


def test_classifier_heldout_accuracy_above_threshold():
    # the demo's default world (3 colours x 2 backgrounds, 8x8); 150 steps take ~2 s on one core.
    # Threshold 0.95: colours are far apart, so anything below means the classifier is broken.
    world = ConceptWorld()
    rep = train_classifier(world, steps=150, heldout=256)
    assert rep.heldout_accuracy >= 0.95, rep.heldout_accuracy


SMOKE = [
    "colours=['red','blue']",
    "shapes=['circle','square']",
    "backgrounds=['black']",
    "size=8",
    "erase='a red circle'",
    "block_out_channels=[8,16]",
    "text_dim=16",
    "pretrain_steps=4",
    "pretrain_batch=8",
    "classifier_steps=4",
    "methods=['uce-v']",
    "finetune_concepts=['a blue circle','a red square']",
    "images_per_concept=2",
    "gd_lr_fractions=[0.3,0.9]",
    "gd_steps=4",
    "top_k=2",
    "probe_batch=4",
    "adamw_steps=2",
    "track_every=1",
    "presence_seeds=2",
    "sample_steps=2",
]


def test_demo_runs_end_to_end_and_rerun_skips_finished_stages(tmp_path):
    cfg = load_demo_config(None, SMOKE)
    run, figs = tmp_path / "run", tmp_path / "figs"
    first = run_demo(cfg, run, figures=figs, progress=False)
    for name in (
        "results.json",
        "results.nc",
        "manifest.json",
        "presence.json",
        "unlearned/uce-v/manifest.json",
    ):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in figs.iterdir()) == [
        "bridge_testbed_predictions.csv",
        "bridge_testbed_presence.png",
        "bridge_testbed_rho.png",
        "bridge_testbed_stages.png",
    ]
    rows = first["predictions"]
    assert len(rows) == 2 * 4 * 5  # (lr, T > 0, readout)
    csv_lines = (figs / "bridge_testbed_predictions.csv").read_text().splitlines()
    assert csv_lines[0] == "method,lr_fraction,lr,step,readout,predicted,measured"
    assert len(csv_lines) == 1 + len(rows)
    # the table's measured presence is the GD run's, recorded on disk with its prediction
    record = json.loads((run / "predict/uce-v.json").read_text())
    last = [r for r in rows if r["readout"] == "presence"][-1]
    assert last["measured"] == record["measured"]["presence"][-1][-1]
    assert last["predicted"] == record["predicted_presence"][-1][-1]
    stamp = (run / "unlearned/uce-v/manifest.json").stat().st_mtime_ns
    second = run_demo(cfg, run, figures=None, progress=False)
    assert (run / "unlearned/uce-v/manifest.json").stat().st_mtime_ns == stamp  # not redone
    assert second["predictions"] == rows
    assert second["timings_s"] == {}  # every stage came from disk
    other = load_demo_config(None, [*SMOKE, "seed=1"])
    with pytest.raises(ValueError, match=re.escape("holds a run with another config")):
        run_demo(other, run, figures=None, progress=False)
