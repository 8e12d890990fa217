"""Commands end to end on a tiny pipeline, saved unlearned folders, and the base-mismatch error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from bridge.data import save_caption_folder
from bridge.testbed.demo import DemoConfig, load_demo_config
from bridge.tiny import save_tiny_pipeline
from bridge.unlearn import apply_uce, uce_token_embeddings
from bridge.unlearn_io import load_unlearned, save_unlearned
from experiments.cli import app


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, world_model):
    unet, text, sched = world_model
    return save_tiny_pipeline(tmp_path_factory.mktemp("base"), unet, text, scheduler=sched)


def test_unlearn_and_finetune_commands(tiny_folder, tmp_path, world):
    runner = CliRunner()
    out = tmp_path / "uce"
    res = runner.invoke(
        app,
        [
            "bridge",
            "unlearn",
            "--base",
            str(tiny_folder),
            "--method",
            "uce",
            "--erase",
            "a red circle",
            "--preserve",
            "a blue square",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "uce" and manifest["args"]["preserve"] == ["a blue square"]
    assert {"versions", "git_commit", "seed", "base_fingerprint"} <= set(manifest)
    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    save_caption_folder(world.sample(torch.tensor([1, 2, 3]), g), list(world.captions[1:]), data)
    ft = tmp_path / "ft"
    args = [
        "bridge",
        "finetune",
        "--base",
        str(tiny_folder),
        "--unlearned",
        str(out),
        "--data",
        str(data),
        "--forget-prompt",
        "a red circle",
        "--out",
        str(ft),
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--track-every",
        "1",
        "--batch-size",
        "2",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    hist = json.loads((ft / "history.json").read_text())
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert {"rho", "forget_loss_recovery"} <= set(hist[-1])
    # a caption folder whose images have the wrong size is refused, naming the file
    bad = tmp_path / "bad"
    save_caption_folder(torch.zeros(1, 3, 4, 4), ["a red square"], bad)
    res = runner.invoke(app, [*args[:7], str(bad), *args[8:11], str(tmp_path / "ft2"), *args[12:]])
    assert res.exit_code == 2 and res.stdout == "" and not (tmp_path / "ft2").exists()
    assert re.fullmatch(
        re.escape(
            f"Error: `--data` '{bad}': image 00000.png has size 4x4, expected 8x8 "
            "(pass resize=True to resize)"
        )
        + "\n",
        res.stderr,
    ), res.stderr


def test_unlearned_checkpoint_from_another_base_is_refused(world_model, tmp_path):
    unet, text, _ = world_model
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]))
    folder = save_unlearned(
        edited, tmp_path / "u", method="uce", args={}, seed=None, base_unet=unet
    )
    loaded = load_unlearned(unet, folder)
    for a, b in zip(edited.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        other = type(unet).from_config(unet.config)  # same architecture, other weights
    with pytest.raises(ValueError, match=re.escape("was made from a base UNet with fingerprint")):
        load_unlearned(other, folder)


def test_demo_config_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape("unknown config keys ['nope']")):
        load_demo_config(None, ["nope=1"])
    with pytest.raises(
        ValueError, match=re.escape("must exclude the erased concept 'a red circle on white'")
    ):
        DemoConfig(finetune_concepts=("a red circle on white",))
    with pytest.raises(ValueError, match=re.escape("`methods` has unknown entries ['sdd']")):
        DemoConfig(methods=("sdd",))
    cfg = load_demo_config(None, ["gd_lr_fractions=[0.1, 0.2]", "erase='a blue circle on black'"])
    assert cfg.gd_lr_fractions == (0.1, 0.2) and cfg.erase == "a blue circle on black"


def test_third_party_partial_state_dict_loads_like_our_folders(world_model, tmp_path):
    """A MACE/SalUn-style release: only the edited tensors, in a safetensors file."""
    from safetensors.torch import save_file

    unet, text, _ = world_model
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]))
    partial = {n: p.detach().contiguous() for n, p in edited.named_parameters() if "attn2.to_" in n}
    save_file(partial, str(tmp_path / "mace_like.safetensors"))
    loaded = load_unlearned(unet, tmp_path / "mace_like.safetensors")
    for (n, a), b in zip(edited.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b), n
    bad = {next(iter(partial)): torch.zeros(3, 3)}
    save_file(bad, str(tmp_path / "other_arch.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_unlearned(unet, tmp_path / "other_arch.safetensors")
