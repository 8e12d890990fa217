"""`resurgence bridge finetune --measured-group`: the default is the group the unlearning edited.

ESD-u edits no cross-attention, so the old fixed group (cross-attn-kv) cannot measure it: the
default comes from the unlearned folder's manifest.json, and a group that misses the edit is
refused with one line (:func:`bridge.hygiene.check_group_covers_edit`).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bridge.data import save_caption_folder
from bridge.groups import select_group
from bridge.tiny import save_tiny_pipeline
from experiments.cli import app


@pytest.fixture(scope="module")
def esd_u(tmp_path_factory, world_model, world):
    """(root, args) of a finetune of ESD-u's unlearned tiny pipeline (2 ESD steps)."""
    unet, text, sched = world_model
    root = tmp_path_factory.mktemp("measured_group")
    save_tiny_pipeline(root / "base", unet, text, scheduler=sched)
    res = CliRunner().invoke(
        app,
        [
            "bridge", "unlearn", "--base", str(root / "base"), "--method", "esd-u",
            "--erase", "a red circle", "--out", str(root / "esd_u"), "--steps", "2",
            "--option", "ddim_steps=3", "--option", "batch_size=2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    g = torch.Generator().manual_seed(0)
    images = world.sample(torch.tensor([1, 2]), g)
    save_caption_folder(images, list(world.captions[1:3]), root / "d")
    args = [
        "bridge", "finetune", "--base", str(root / "base"), "--unlearned", str(root / "esd_u"),
        "--data", str(root / "d"), "--forget-prompt", "a red circle", "--steps", "1",
        "--lr", "1e-3", "--track-every", "1", "--batch-size", "2",
    ]  # fmt: skip
    return root, args


def test_esd_u_finetunes_over_its_manifest_group(esd_u):
    root, args = esd_u
    res = CliRunner().invoke(app, [*args, "--out", str(root / "ft")])
    assert res.exit_code == 0, res.output
    config = json.loads((root / "ft" / "manifest.json").read_text())["config"]
    assert config["measured_group"] == "non-cross-attn"
    hist = json.loads((root / "ft" / "history.json").read_text())
    assert [h["step"] for h in hist] == [0, 1] and hist[0]["rho"] == 0 != hist[1]["rho"]


def test_a_group_that_misses_the_edit_is_one_line(esd_u, world_model):
    root, args = esd_u
    out = root / "ft_kv"
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--measured-group", "cross-attn-kv"])
    n = select_group(world_model[0], "cross-attn-kv").numel
    expected = (
        "Error: `--measured-group` 'cross-attn-kv': delta = theta_u - theta_0 is zero over group "
        f"'cross-attn-kv' ({n} parameters); esd_u edits every parameter except attn2, time "
        "embedding, conv_out (group 'non-cross-attn'): measure and fine-tune the group the "
        "method edits."
    )
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert res.stderr.splitlines() == [expected], res.stderr
    assert not out.exists()  # refused before anything was written
