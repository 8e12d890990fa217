"""Training end to end on a tiny model: saved bundle, fingerprints, resume guard, CLI errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from bridge.realworld.bundle import load_model
from bridge.realworld.fingerprints import FingerprintError, verify_fingerprints
from experiments.cli_bridge_realworld import realworld_app
from tests.bridge_realworld._noto import requires_noto
from tests.bridge_realworld.conftest import TINY, _sets

pytestmark = requires_noto  # the tiny run trains on both styles

def test_train_saves_a_verified_bundle(trained):
    out, summary = trained
    assert summary["unet_steps_run"] == 3 and summary["final_loss"] > 0
    files = verify_fingerprints(out)
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "classifiers/concept.safetensors",
        "classifiers/style.safetensors",
        "world.json",
        "ATTRIBUTION.txt",
    } <= set(files)
    assert not (out / "train_state.pt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == files and manifest["config"]["size"] == 16
    assert "CC BY-SA 4.0" in (out / "ATTRIBUTION.txt").read_text()
    model = load_model(out)
    assert (
        model.world.concepts == ("dog", "cat", "pistol")
        and model.unet.config.cross_attention_dim == 384
    )
    cond = model.text.encode_prompts(["a photo of a dog"])
    with torch.no_grad():
        eps = model.unet(torch.zeros(1, 3, 16, 16), torch.tensor([10]), cond).sample
    assert eps.shape == (1, 3, 16, 16) and torch.isfinite(eps).all()


def test_finetune_set_is_sampled_from_the_base_model(trained):
    from bridge.realworld.pipeline import sample_finetune_set
    from bridge.realworld.protocol import Protocol, SimilarityBin, default_tasks

    model = load_model(trained[0])
    task = default_tasks(model.world.concepts)["pistol"]
    pairs = Protocol(seeds_per_prompt=2).finetune_set(
        task, SimilarityBin(0, 0, 1, ("dog",), (0.5,))
    )
    pairs = pairs[:3]  # two seeds of one prompt, one of the next
    args = (model.unet, model.text, model.scheduler, pairs)
    images, captions = sample_finetune_set(*args, steps=2)
    again, _ = sample_finetune_set(*args, steps=2)
    assert images.shape == (3, 3, 16, 16) and captions == [p for p, _ in pairs]
    assert torch.equal(images, again)  # seeded starting noise, deterministic DDIM
    assert (images[0] - images[1]).abs().mean() > 1e-3  # another seed, another image
    with pytest.raises(ValueError, match=re.escape("`pairs` is empty")):
        sample_finetune_set(model.unet, model.text, model.scheduler, [])


def test_a_changed_weight_file_is_a_one_line_error(trained, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    weights = out / "classifiers" / "style.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    expected = f"classifiers/style.safetensors in {out} does not match its fingerprint"
    with pytest.raises(FingerprintError, match=re.escape(expected)):
        load_model(out)
    res = CliRunner().invoke(realworld_app, ["verify", str(out)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert (
        len(lines) == 1
        and expected in lines[0]
        and "retrain with `resurgence bridge realworld train`" in lines[0]
    )
    weights.unlink()
    with pytest.raises(
        FingerprintError, match=re.escape("classifiers/style.safetensors is listed in")
    ):
        verify_fingerprints(out)
    (out / "fingerprints.json").unlink()
    with pytest.raises(FingerprintError, match=re.escape(f"no fingerprints.json in {out}")):
        verify_fingerprints(out)


def test_resume_state_of_another_config_is_refused(tmp_path):
    from bridge.realworld.config import load_run_config
    from bridge.realworld.text import load_minilm
    from bridge.realworld.train import train_unet

    cfg = load_run_config(
        None,
        TINY[:2]
        + [
            "steps=4",
            "checkpoint_every=2",
            "block_out_channels=[8, 16, 32]",
            "attention_head_dim=2",
        ],
    )
    state = tmp_path / "train_state.pt"
    torch.save({"key": "another run", "step": 2}, state)
    with pytest.raises(ValueError, match=re.escape(f"{state} was saved by another config")):
        train_unet(cfg.world(), load_minilm(), cfg.train_config(), tmp_path, progress=False)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    from bridge.realworld.config import load_run_config
    from bridge.realworld.text import load_minilm
    from bridge.realworld.train import train_unet

    items = [
        "concepts=['dog', 'cat']",
        "size=16",
        "checkpoint_every=2",
        "block_out_channels=[8, 16, 32]",
        "attention_head_dim=2",
        "batch_size=4",
    ]
    full = load_run_config(None, [*items, "steps=4"])
    text = load_minilm()
    straight = train_unet(full.world(), text, full.train_config(), tmp_path / "a", progress=False)
    # a run stopped after its step-2 checkpoint: same config, the state file left behind
    (tmp_path / "b").mkdir()
    import bridge.realworld.train as train_mod

    class Stop(Exception):
        pass

    real_save = torch.save

    def save_then_stop(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        raise Stop

    train_mod.torch.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train_unet(full.world(), text, full.train_config(), tmp_path / "b", progress=False)
    finally:
        train_mod.torch.save = real_save
    import os

    os.replace(tmp_path / "b" / "train_state.tmp", tmp_path / "b" / "train_state.pt")
    resumed = train_unet(full.world(), text, full.train_config(), tmp_path / "b", progress=False)
    assert len(resumed.losses) == 2 and resumed.losses == straight.losses[2:]
    after = resumed.unet.state_dict()
    for name, value in straight.unet.state_dict().items():
        assert torch.equal(value, after[name]), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "stpes=3"], "`--set`: unknown key `stpes` in --set; did you mean 'steps'"),
        (["--set", "size=18"], "`size` must be a multiple of 4 in [16, 32] pixels, got 18."),
        (["--set", "lr='fast'"], "`lr` in --set must be float, got 'fast'."),
        (["--set", "concepts=['dgo']"], "`concept` 'dgo' is not in the world; did you mean 'dog'"),
        (["--set", "styles=['noto', 'sd']"], "`styles` has unknown style 'sd'"),
    ],
)
def test_bad_config_is_one_line_before_any_training(tmp_path, args, message):
    # the tiny settings first: should a bad value slip through, only a tiny model would train
    res = CliRunner().invoke(
        realworld_app, ["train", "--out", str(tmp_path / "m"), *_sets(TINY), *args]
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "m").exists()
