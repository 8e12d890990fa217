"""The tiny testbed's shipped base pipeline + classifier: fingerprints, provenance, when they load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bridge.realworld.fingerprints import (
    FINGERPRINTS,
    FingerprintError,
    sha256_file,
    verify_fingerprints,
)
from bridge.testbed import shipped
from bridge.testbed.demo import DemoConfig, load_demo_config
from bridge.testbed.shipped import SHIPPED, copy_shipped_base, copy_shipped_classifier, ship
from bridge.testbed.stages import Stages

DEFAULT_TOML = Path(__file__).resolve().parents[2] / "experiments/configs/bridge_testbed.toml"


def test_shipped_files_match_their_fingerprints_and_the_default_config():
    files = verify_fingerprints(SHIPPED)
    on_disk = {
        p.relative_to(SHIPPED).as_posix()
        for p in SHIPPED.rglob("*")
        if p.is_file() and p.name != FINGERPRINTS
    }
    assert set(files) == on_disk  # every shipped file is recorded, none is left out
    record = shipped.shipped_record()
    for cfg in (DemoConfig(), load_demo_config(DEFAULT_TOML)):  # what `make demo` runs
        values = cfg.to_dict()
        assert record["trained_with"]["base"] == {k: values[k] for k in shipped.BASE_KEYS}
        assert record["trained_with"]["classifier"] == {
            k: values[k] for k in shipped.CLASSIFIER_KEYS
        }


def test_shipped_classifier_scores_the_accuracy_it_records():
    """Held-out accuracy recomputed on fresh renders (not the training seeds) vs the record."""
    from bridge.testbed.classifier import ConceptClassifier

    world = DemoConfig().world
    model = ConceptClassifier(len(world.concepts))
    model.load_state_dict(torch.load(SHIPPED / "classifier.pt", weights_only=True))
    recorded = json.loads((SHIPPED / "classifier.json").read_text())["heldout_accuracy"]
    ids = torch.arange(len(world.concepts)).repeat_interleave(200)
    images = world.sample(ids, torch.Generator().manual_seed(987_654))
    with torch.no_grad():
        accuracy = float((model.eval().probabilities(images).argmax(-1) == ids).double().mean())
    assert recorded >= 0.95 and accuracy >= recorded - 0.03, (accuracy, recorded)


def test_default_stages_load_the_shipped_files_byte_for_byte(tmp_path):
    st = Stages(DemoConfig(), tmp_path / "run", progress=False)
    st.base()
    st.classifier()
    copied = verify_fingerprints(SHIPPED)
    for rel, digest in copied.items():  # base/... -> run/base/..., classifier.* -> run/
        assert sha256_file(tmp_path / "run" / rel) == digest, rel
    assert json.loads((tmp_path / "run" / "base" / "done.json").read_text()) == {"shipped": True}
    assert "pretrain_s" not in st.timings and "classifier_s" not in st.timings


def test_other_configs_train_and_shipped_weights_false_always_trains(tmp_path, monkeypatch):
    for cfg in (DemoConfig(pretrain_steps=999), DemoConfig(colours=("red", "green"))):
        assert not copy_shipped_base(cfg, tmp_path / "b")
    assert not copy_shipped_classifier(DemoConfig(classifier_steps=5), tmp_path / "c")
    assert copy_shipped_classifier(DemoConfig(pretrain_steps=5), tmp_path / "c")  # not its key
    calls = []

    def fake_pretrain(*args, **kwargs):
        calls.append(kwargs["steps"])
        raise RuntimeError("training")

    monkeypatch.setattr("bridge.testbed.train.pretrain", fake_pretrain)
    st = Stages(DemoConfig(shipped_weights=False), tmp_path / "run", progress=False)
    with pytest.raises(RuntimeError, match="training"):
        st.base()
    assert calls == [1000] and not (tmp_path / "run" / "base").exists()


def test_a_tampered_shipped_file_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(SHIPPED, folder)
    with open(folder / "base" / "unet" / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(FingerprintError) as err:
        copy_shipped_base(DemoConfig(), tmp_path / "dest", folder=folder)
    message = str(err.value)
    assert "base/unet/config.json" in message and "\n" not in message
    assert not (tmp_path / "dest").exists()


def test_ship_rewrites_the_same_record_and_refuses_a_copied_base(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(SHIPPED / "base", run / "base")
    (run / "base" / "done.json").write_text('{"wall_s": 88.9}')
    for name in ("classifier.pt", "classifier.json"):
        shutil.copyfile(SHIPPED / name, run / name)
    (run / "config.json").write_text(json.dumps(DemoConfig().to_dict()))
    out = tmp_path / "weights"
    ship(run, folder=out)
    again, original = json.loads((out / FINGERPRINTS).read_text()), shipped.shipped_record()
    assert again["files"] == original["files"]
    assert again["trained_with"] == original["trained_with"]
    (run / "base" / "done.json").write_text('{"shipped": true}')
    with pytest.raises(ValueError, match="copied from the shipped weights"):
        ship(run, folder=tmp_path / "w2")
    (run / "classifier.pt").unlink()
    with pytest.raises(FileNotFoundError, match="classifier.pt"):
        ship(run, folder=tmp_path / "w3")
