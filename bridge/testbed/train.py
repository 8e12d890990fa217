"""Pretraining of the testbed's text-to-image model: the tiny UNet on the concept world, on CPU.

The tiny CLIP text encoder (from :mod:`bridge.tiny`) is randomly initialised and frozen, as SD's
CLIP encoder is frozen: its outputs for captions sharing words overlap strongly, which is the
common component of theory.md section 1. Only the UNet trains (epsilon prediction, SD's noise
schedule, classifier-free-guidance dropout ``p_null``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bridge.testbed.world import ConceptWorld

__all__ = ["ModelConfig", "build_world_model", "pretrain", "diffusion_loss"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the testbed's UNet and text encoder (pixel space, 3 channels)."""

    block_out_channels: tuple[int, ...] = (16, 32)
    text_dim: int = 32
    attention_head_dim: int = 4
    norm_num_groups: int = 8
    text_layers: int = 2
    max_length: int = 8
    # Pixel-space images at 16x16 need a schedule that reaches pure noise: SD's scaled-linear
    # one stops at alpha_bar = 0.005, tuned for 64x64 latents; the cosine one is the usual choice.
    beta_schedule: str = "squaredcos_cap_v2"
    seed: int = 0


def build_world_model(world: ConceptWorld, cfg: ModelConfig = ModelConfig()):
    """Random tiny UNet, tokenizer + text encoder and scheduler for ``world``.

    Returns:
      ``(unet, text_encoder, scheduler)``: ``UNet2DConditionModel``,
      :class:`bridge.sd.TextEncoder`,
      ``DDPMScheduler`` (SD's scaled-linear schedule).
    """
    from bridge.sd import TextEncoder
    from bridge.tiny import (
        DEFAULT_VOCAB,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        tiny_scheduler,
    )

    unet = build_tiny_unet(
        cfg.seed,
        sample_size=world.size,
        in_channels=3,
        block_out_channels=cfg.block_out_channels,
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    # bridge.tiny's general vocabulary plus the world's words (unused words are harmless rows)
    vocab = tuple(dict.fromkeys((*DEFAULT_VOCAB, *world.vocabulary)))
    tok = build_word_tokenizer(vocab, max_length=cfg.max_length)
    enc = build_tiny_text_encoder(
        tok, hidden_size=cfg.text_dim, seed=cfg.seed + 1, num_layers=cfg.text_layers
    )
    if cfg.beta_schedule == "scaled_linear":
        sched = tiny_scheduler("ddpm")
    else:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule)
    return unet, TextEncoder(tokenizer=tok, model=enc), sched


def diffusion_loss(unet, scheduler, x0, embeds, timesteps, noise) -> torch.Tensor:
    r"""Mean squared epsilon error :math:`\|\epsilon_\theta(x_t, t, c) - \epsilon\|^2 / n`.

    Written by hand (not ``F.mse_loss``), which keeps ``torch.func`` transforms working.
    """
    xt = scheduler.add_noise(x0, noise, timesteps)
    pred = unet(xt, timesteps, embeds).sample
    return ((pred - noise) ** 2).mean()


def pretrain(
    world: ConceptWorld,
    out_dir: str | Path,
    *,
    cfg: ModelConfig = ModelConfig(),
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    p_null: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the UNet on the world and save an SD-layout folder at ``out_dir``.

    Args:
      world: the concept world (every concept, uniform).
      out_dir: destination folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
      cfg: model sizes. steps, batch_size, lr: AdamW schedule (cosine decay to 0).
      p_null: probability of replacing a caption by the null prompt (for guidance).
      seed: data and noise seed.

    Returns:
      ``out_dir`` as a ``Path``.
    """
    from bridge.tiny import save_tiny_pipeline

    unet, text, sched = build_world_model(world, cfg)
    embeds = text.encode_prompts(list(world.captions) + [""])  # (K + 1, seq, dim), frozen
    k = len(world.concepts)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.05
    )
    unet.train()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for _ in bar:
        ids = torch.randint(0, k, (batch_size,), generator=gen)
        x0 = world.sample(ids, gen)
        drop = torch.rand(batch_size, generator=gen) < p_null
        c = embeds[torch.where(drop, k, ids)]
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = diffusion_loss(unet, sched, x0, c, t, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return save_tiny_pipeline(out_dir, unet, text, scheduler=sched)
