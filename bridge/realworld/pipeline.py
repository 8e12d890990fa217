"""One call that trains the whole real-image testbed: UNet, presence and style classifiers."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bridge.realworld.bundle import save_model
from bridge.realworld.classifier import train_classifier
from bridge.realworld.config import RunConfig
from bridge.realworld.text import load_minilm
from bridge.realworld.train import train_unet

__all__ = ["sample_finetune_set", "train_testbed"]


def train_testbed(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train the UNet and both classifiers of ``cfg`` and save a verified bundle in ``out_dir``.

    Args:
      cfg: the run config. out_dir: the model folder (a saved UNet state is resumed).
      progress: show progress bars.

    Returns:
      Summary: held-out accuracies, mean loss of the last 100 steps, seconds a step, wall time.
    """
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    world, text = cfg.world(), load_minilm(max_length=cfg.max_length)
    reports = [
        train_classifier(
            world,
            target=target,
            steps=cfg.classifier_steps,
            per_pair=cfg.classifier_per_pair,
            width=cfg.classifier_width,
            seed=cfg.seed,
            progress=progress,
        )
        for target in ("concept", "style")
    ]
    result = train_unet(world, text, cfg.train_config(), out_dir, progress=progress)
    tail = result.losses[-100:]
    summary = {
        "presence_heldout_accuracy": reports[0].heldout_accuracy,
        "style_heldout_accuracy": reports[1].heldout_accuracy,
        "classifier_step_seconds": reports[0].step_seconds,
        "unet_steps_run": len(result.losses),
        "unet_step_seconds": result.step_seconds,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }
    save_model(out_dir, world, text, reports, train_info={"config": cfg.to_dict(), **summary})
    summary["wall_time_s"] = time.time() - t0
    return summary


def sample_finetune_set(
    unet, text, scheduler, pairs, *, steps: int = 20, guidance_scale: float = 3.0
):
    """Sample the benign fine-tuning set FROM THE BASE MODEL, one image a ``(prompt, seed)``.

    Args:
      unet, text, scheduler: the base (pre-unlearning) model, its text encoder and schedule.
      pairs: ``(prompt, seed)`` pairs, e.g. :meth:`bridge.realworld.protocol.Protocol.finetune_set`.
      steps: DDIM steps. guidance_scale: classifier-free guidance scale.

    Returns:
      ``(images, captions)``: ``(n, 3, s, s)`` in [-1, 1] and the n prompts, ready for
      :func:`bridge.data.save_caption_folder` or :class:`bridge.finetune.FinetuneData`.

    Raises:
      ValueError: if ``pairs`` is empty.
    """
    from bridge.generate import ddim_sample

    if not pairs:
        raise ValueError("`pairs` is empty: a fine-tuning set needs at least one (prompt, seed).")
    prompts = [p for p, _ in pairs]
    unique = sorted(set(prompts))
    embeds = text.encode_prompts(unique + [""])
    rows = torch.tensor([unique.index(p) for p in prompts])
    images = ddim_sample(
        unet,
        embeds[rows],
        embeds[-1:],
        scheduler=scheduler,
        seeds=[int(s) for _, s in pairs],
        steps=steps,
        guidance_scale=guidance_scale,
    )
    return images.clamp(-1, 1), prompts
