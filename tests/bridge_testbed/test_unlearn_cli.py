"""`resurgence bridge unlearn` end to end for every method, and each bad input as one line (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bridge.data import save_caption_folder
from bridge.tiny import build_tiny_unet, save_tiny_pipeline
from bridge.unlearning.names import METHOD_TABLE, all_method_names
from experiments.cli import app

#: Per method: the cheapest flags that run all of it (``--option`` reaches any other knob).
FLAGS = {
    "uce": ["--from-token", "first"],
    "uce_v": [],
    "esd_x": ["--steps", "2", "--option", "ddim_steps=3", "--option", "batch_size=2"],
    "esd_u": ["--steps", "2", "--option", "ddim_steps=3", "--option", "batch_size=2"],
    "sdd": ["--steps", "2", "--option", "warmup=1", "--option", "ddim_steps=3"],
    "salun": ["--steps", "2", "--threshold", "0.3", "--option", "batch_size=2"],
    "scissorhands": ["--steps", "2", "--sparsity", "0.99", "--option", "prune_batches=1"],
    "erasediff": ["--steps", "1", "--option", "k_steps=1", "--option", "steps_per_epoch=1"],
    "mace": ["--steps", "2", "--rank", "2"],
}
GROUPS = {m.name: m.group for m in METHOD_TABLE}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, world_model, world):
    unet, text, sched = world_model
    root = tmp_path_factory.mktemp("unlearn_cli")
    save_tiny_pipeline(root / "base", unet, text, scheduler=sched)
    images = world.sample(torch.tensor([0, 0, 2, 1]), torch.Generator().manual_seed(0))
    captions = ["a red circle", "a red circle", "a blue circle", "a red square"]
    save_caption_folder(images, captions, root / "data")
    mace = root / "mace"
    save_caption_folder(images[:2], captions[:2], mace / "a red circle")
    for p in (mace / "a red circle").glob("*.txt"):
        p.unlink()
    save_caption_folder(images[:2], captions[:2], mace / "a red circle mask")
    for p in (mace / "a red circle mask").glob("*.txt"):
        p.unlink()
    return root


def _invoke(*args):
    return CliRunner().invoke(app, ["bridge", "unlearn", *args])


def _base_args(folders, out, method):
    return [
        "--base",
        str(folders / "base"),
        "--erase",
        "a red circle",
        "--preserve",
        "a blue circle",
        "--method",
        method,
        "--out",
        str(out),
        "--per-prompt",
        "2",
    ]


def test_help_lists_every_method():
    res = _invoke("--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for name in all_method_names():
        assert f"{name}:" in text, name


@pytest.mark.parametrize("method", list(FLAGS))
def test_every_method_runs_from_the_command_line(folders, tmp_path, method):
    out = tmp_path / method
    extra = []
    if method in ("salun", "scissorhands", "erasediff"):
        extra = ["--data", str(folders / "data"), "--preserve", "a red square"]
    if method == "mace":
        extra = ["--mace-data", str(folders / "mace")]
    res = _invoke(*_base_args(folders, out, method), *FLAGS[method], *extra)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["args"]["edited_group"] == GROUPS[method]
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler").is_dir()


def test_dashed_spelling_is_accepted_with_a_note(folders, tmp_path):
    res = _invoke(*_base_args(folders, tmp_path / "x", "esd-x"), *FLAGS["esd_x"])
    assert res.exit_code == 0, res.output
    assert "Note: method 'esd-x' is spelled 'esd_x' (the name theory uses); using esd_x." in (
        res.stderr
    )
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["method"] == "esd_x"


@pytest.fixture(scope="module")
def bad_files(folders):
    other = build_tiny_unet(0, sample_size=8, in_channels=3, cross_attention_dim=32)
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, folders / "other.safetensors"
    )
    from tests.bridge.test_checkpoint_formats import to_ldm

    unet = build_tiny_unet(0, sample_size=8, in_channels=3, cross_attention_dim=16)
    ldm = {
        "model.diffusion_model." + to_ldm(k, unet.config): v.contiguous()
        for k, v in unet.state_dict().items()
    }
    torch.save({"state_dict": ldm}, folders / "sd.ckpt")
    wrong = folders / "mace_wrong"
    (wrong / "a blue circle").mkdir(parents=True)
    count = folders / "mace_count"
    save_caption_folder(torch.zeros(2, 3, 8, 8), ["x", "x"], count / "a red circle")
    save_caption_folder(torch.zeros(1, 3, 8, 8), ["x"], count / "a red circle mask")
    return folders


K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
BAD = {
    "unknown-method": (
        ["--method", "macee"],
        "`--method`: unknown unlearning method 'macee'; did you mean mace? valid: "
        + ", ".join(all_method_names())
        + ".",
    ),
    "rank-zero": (
        ["--method", "mace", "--rank", "0"],
        "`--rank` (MACE's LoRA rank) must be an integer >= 1; got 0.",
    ),
    "threshold-outside": (
        ["--method", "salun", "--threshold", "1.5"],
        "`--threshold` must be in (0, 1), a fraction of the UNet's entries; got 1.5.",
    ),
    "flag-of-another-method": (
        ["--method", "uce", "--threshold", "0.5"],
        "`--threshold` does not apply to method 'uce'; it is an option of salun.",
    ),
    "unknown-option": (
        ["--method", "sdd", "--option", "decay=0.9"],
        "`--option` 'decay=0.9' must be KEY=VALUE with KEY one of steps, lr, weight_decay, "
        "warmup, ema_decay, clip, ddim_steps, guidance_scale, batch_size, params (the options "
        "of sdd).",
    ),
    "masks-do-not-match-concepts": (
        ["--method", "mace", "--mace-data", "{root}/mace_wrong"],
        "`--mace-data` '{root}/mace_wrong': its image folders ['a blue circle'] do not match the "
        "erased concepts ['a red circle']; give one folder named after each --erase prompt.",
    ),
    "masks-do-not-match-images": (
        ["--method", "mace", "--mace-data", "{root}/mace_count"],
        "`--mace-data`: 1 masks in '{root}/mace_count/a red circle mask' for 2 images of "
        "'a red circle'; the masks do not match the concept's images (one mask per image, "
        "paired in sorted order).",
    ),
    "another-architecture": (
        ["--base-unet", "{root}/other.safetensors"],
        f"`--base-unet` '{{root}}/other.safetensors': architecture mismatch with "
        f"{{root}}/other.safetensors: tensor '{K}' has shape (8, 32) there but (8, 16) in the "
        "config",
    ),
    "ldm-without-base-config": (
        ["--base", "{root}/sd.ckpt"],
        "`--base` '{root}/sd.ckpt' is a CompVis/LDM checkpoint; converting it needs the base "
        "pipeline's unet/config.json: give `--base` the diffusers pipeline folder and this file "
        "as `--base-unet`.",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(bad_files, tmp_path, case):
    change, message = BAD[case]
    root = str(bad_files)
    args = {"--base": f"{root}/base", "--erase": "a red circle", "--out": str(tmp_path / "o")}
    flat = []
    for key, value in args.items():
        if key not in change:
            flat += [key, value]
    flat += [c.replace("{root}", root) for c in change]
    res = _invoke(*flat)
    assert res.exit_code == 2, res.output
    want = "Error: " + message.replace("{root}", root) + "\n"
    assert res.stderr == want, res.stderr
    assert not (tmp_path / "o").exists()


def test_data_methods_need_prompts_to_preserve(folders, tmp_path):
    res = _invoke(
        "--base",
        str(folders / "base"),
        "--erase",
        "a red circle",
        "--method",
        "salun",
        "--out",
        str(tmp_path / "o"),
    )
    assert res.exit_code == 2
    assert res.stderr == (
        "Error: method salun trains on retain data: give at least one `--preserve` prompt.\n"
    )
