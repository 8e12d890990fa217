"""kill -9 a `resurgence bridge finetune` at a seeded random point: rerunning the same command
resumes from the last complete checkpoint and ends with exactly the uninterrupted run's history,
weights and optimizer state; an unreadable checkpoint is never used."""

from __future__ import annotations

import random
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bridge.data import save_caption_folder
from bridge.finetune import FinetuneConfig, FinetuneData, finetune
from bridge.tiny import save_tiny_pipeline
from bridge.unlearn import apply_uce, uce_token_embeddings
from bridge.unlearn_io import save_unlearned
from experiments.cli import app
from tests._crash import kill_at_random_point, run, start

STEPS, EVERY = 40, 4  # 10 checkpoints, 0.1-0.5 s apart here (AdamW on the tiny UNet, batch 4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, world, world_model):
    """A tiny base pipeline, its UCE-unlearned copy and a caption folder, as a user has them."""
    unet, text, sched = world_model
    root = tmp_path_factory.mktemp("crash")
    base = save_tiny_pipeline(root / "base", unet, text, scheduler=sched)
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    unlearned = save_unlearned(
        edited, root / "uce", method="uce", args={}, seed=None, base_unet=unet, base_folder=base
    )
    ids = torch.tensor([1, 2, 3] * 2)  # every concept but the erased "a red circle"
    images = world.sample(ids, torch.Generator().manual_seed(0))
    data = save_caption_folder(images, [world.captions[i] for i in ids.tolist()], root / "data")
    return base, unlearned, data


class _CheckpointStep:
    """Progress of a run: checkpoints written so far, read from the (atomic) checkpoint file."""

    def __init__(self, path):
        self.path, self.seen, self.step = path, None, 0

    def __call__(self) -> int:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return 0
        if (stat.st_ino, stat.st_mtime_ns) != self.seen:  # each atomic write is a new inode
            self.seen = (stat.st_ino, stat.st_mtime_ns)
            # reading while the run writes is safe only because the file is replaced atomically
            self.step = torch.load(self.path, map_location="cpu", weights_only=False)["step"]
        return self.step // EVERY


def _command(folders, out):
    base, unlearned, data = folders
    return [
        "bridge", "finetune", "--base", str(base), "--unlearned", str(unlearned),
        "--data", str(data), "--forget-prompt", "a red circle", "--out", str(out),
        "--steps", str(STEPS), "--lr", "1e-3", "--optimizer", "adamw",
        "--track-every", str(EVERY), "--batch-size", "4", "--seed", "3",
    ]  # fmt: skip


@pytest.mark.slow
def test_finetune_killed_at_random_and_rerun_equals_an_uninterrupted_run(folders, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted run: the same command in this process (one thread, as in the
    # subprocesses), which saves the ~10 s of imports a third process would cost
    done = CliRunner().invoke(app, _command(folders, reference))
    assert done.exit_code == 0, done.output
    proc = start(_command(folders, killed), tmp_path / "killed.log")
    progress = _CheckpointStep(killed / "checkpoint.pt")
    kill = kill_at_random_point(
        proc, tmp_path / "killed.log", progress, STEPS // EVERY, random.Random(1)
    )
    print(kill)  # where it landed (shown with -rP, and on failure)

    # what the kill left: a complete checkpoint of a finished step; the final files only once
    # the last step is checkpointed (a kill can also land after it, while they are written)
    state = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)
    resumed_from = state["step"]
    assert resumed_from % EVERY == 0 and kill.units_before * EVERY <= resumed_from, kill
    assert [h["step"] for h in state["history"]] == list(range(0, resumed_from + 1, EVERY))
    if resumed_from < STEPS:
        assert not (killed / "history.json").exists() and not (killed / "unet").exists()

    output = run(_command(folders, killed), tmp_path / "rerun.log")
    # it resumed (tqdm counts the remaining steps only) instead of starting again
    assert re.search(rf"\b0/{STEPS - resumed_from} \[", output), output[-2000:]
    assert not [p for p in killed.rglob("*") if ".partial" in p.name]  # temporaries cleared

    for name in ("history.json", "final.json"):  # floats as repr: equal text = equal bits
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    weights = "unet/diffusion_pytorch_model.safetensors"
    got, want = load_file(killed / weights), load_file(reference / weights)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    got = torch.load(killed / "checkpoint.pt", weights_only=False)
    want = torch.load(reference / "checkpoint.pt", weights_only=False)
    assert got["step"] == want["step"] == STEPS and got["history"] == want["history"]
    assert torch.equal(got["rng"], want["rng"])
    for name, value in want["trainable"].items():
        assert torch.equal(got["trainable"][name], value), name
    for key, moments in want["optimizer"]["state"].items():  # AdamW moments and step counts
        for which, value in moments.items():
            assert torch.equal(got["optimizer"]["state"][key][which], value), (key, which)
    assert want["history"][-1]["rho"] != 0.0  # fine-tuning moved the measured group


def test_an_unreadable_checkpoint_is_not_used(world, world_model, tmp_path):
    unet, text, sched = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    ids = torch.tensor([1, 2, 3, 1])
    data = FinetuneData(
        world.sample(ids, torch.Generator().manual_seed(0)),
        text.encode_prompts([world.captions[i] for i in ids.tolist()]),
        text.encode_prompts([""]),
    )
    cfg = FinetuneConfig(steps=4, lr=1e-3, batch_size=2, track_every=2, checkpoint_every=2)
    full = finetune(unlearned, data, cfg, scheduler=sched, base_unet=unet, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    finetune(
        unlearned, data, cfg, scheduler=sched, base_unet=unet, out_dir=tmp_path, progress=False
    )
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy cut short
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {ckpt} is unreadable")):
        again = finetune(
            unlearned, data, cfg, scheduler=sched, base_unet=unet, out_dir=tmp_path, progress=False
        )
    assert again.history == full.history  # started from step 0, so the same run
    for (name, a), b in zip(full.unet.named_parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.load(ckpt, weights_only=False)["step"] == 4  # and replaced by a good one
