r"""Probes: every frozen draw a prediction and its measurement share (pipeline step 1).

A prediction of resurgence and the fine-tuning run that tests it must see the same data: the same
fine-tuning quadrature (x_t, t, c, target), the same forget quadrature, and the same sampler seeds
for presence. :class:`Probes` holds them, built once from one ``seed`` with named offsets (no magic
``seed + 1`` spread over modules):

* fine-tuning probes (:func:`finetune_probes`): the denoising loss on the fine-tuning data
  (target eps) or, with prompts only, the *in-distribution* loss on N(0, I) inputs whose targets
  are the base model's own predictions (theory.md s.4: its gradient vanishes at theta_0);
* forget probes (:func:`forget_probes`): the denoising loss with target eps on the erased
  concept's data: given images/latents, or samples of the base model under the erased prompt
  (the one definition of the forget loss behind ``forget_loss_recovery`` and ``output_rho``);
* the sampler probe (:class:`SamplerProbe`): the erased prompt, the null prompt, the DDIM
  schedule and the x_T seeds that presence is generated from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bridge.loss import ProbeBatch, make_probe_batches, teacher_targets

__all__ = [
    "FINETUNE_SEED_OFFSET",
    "FORGET_SEED_OFFSET",
    "Probes",
    "SamplerProbe",
    "finetune_probes",
    "forget_probes",
    "sampler_probe",
]

#: Offsets of ``seed`` for each frozen draw, so that no two draws share a generator stream.
FINETUNE_SEED_OFFSET = 1
FORGET_SEED_OFFSET = 2


@dataclass(frozen=True)
class SamplerProbe:
    """Deterministic DDIM sampling (eta = 0) of one prompt from fixed x_T seeds.

    Attributes:
      cond: prompt embedding ``(1, seq, dim)``. uncond: null-prompt embedding ``(1, seq, dim)``.
      seeds: one seed per image; image i starts from :func:`bridge.generate.initial_noise`.
      steps: DDIM steps (>= 1). guidance_scale: classifier-free guidance s (1 = none).
      scheduler_config: the config a ``DDIMScheduler`` is built from (``scheduler.config``).

    Raises:
      ValueError: no seeds, or fewer than one step (one line, naming the argument).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    scheduler_config: Any

    def __post_init__(self) -> None:
        if len(self.seeds) == 0:
            raise ValueError("`seeds` is empty: the sampler needs at least one x_T seed.")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"`steps` must be an integer >= 1 DDIM steps; got {self.steps!r}.")

    def scheduler(self):
        """A fresh ``DDIMScheduler`` with this probe's timesteps set."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler_config)
        ddim.set_timesteps(int(self.steps))
        return ddim


def sampler_probe(
    text_encoder,
    prompt: str,
    *,
    scheduler,
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
) -> SamplerProbe:
    """The :class:`SamplerProbe` of ``prompt`` (encoded with the null prompt).

    Args:
      text_encoder: :class:`bridge.sd.TextEncoder`. prompt: the erased prompt.
      scheduler: any diffusers scheduler (its config builds the DDIM sampler).
      seeds: x_T seeds. steps: DDIM steps. guidance_scale: s.

    Returns:
      :class:`SamplerProbe`.
    """
    embeds = text_encoder.encode_prompts([prompt, ""])
    return SamplerProbe(
        embeds[:1], embeds[1:], tuple(int(s) for s in seeds), steps, guidance_scale, scheduler.config
    )


def _noised_inputs(n: int, unet, seed: int) -> torch.Tensor:
    """N(0, I) inputs of the UNet's latent shape, ``(n, C, H, W)`` float64."""
    size, chans = unet.config.sample_size, unet.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, chans, size, size, generator=gen, dtype=torch.float64)


def finetune_probes(
    text_encoder,
    prompts: Sequence[str],
    latents: torch.Tensor | None = None,
    *,
    alphas_cumprod: torch.Tensor,
    batch_size: int,
    seed: int,
    draws: int = 1,
    teacher=None,
) -> list[ProbeBatch]:
    """Frozen quadrature of the fine-tuning loss (seed ``seed + FINETUNE_SEED_OFFSET``).

    Args:
      text_encoder: :class:`bridge.sd.TextEncoder`. prompts: one caption per latent (or the
        in-distribution prompts when ``latents`` is None).
      latents: fine-tuning data ``(N, C, H, W)``; None = in-distribution loss (needs ``teacher``).
      alphas_cumprod: ``(num_train_timesteps,)``. batch_size: samples per batch.
      seed: the probes' seed. draws: (t, eps) draws per sample.
      teacher: the base UNet whose predictions are the in-distribution targets.

    Returns:
      Probe batches on ``teacher``'s (or the latents') device and dtype.

    Raises:
      ValueError: no prompts, latents and prompts of different lengths, or no teacher.
    """
    if not prompts:
        raise ValueError("`prompts` is empty: the fine-tuning loss needs at least one prompt.")
    if latents is not None and len(latents) != len(prompts):
        raise ValueError(
            f"{len(latents)} fine-tuning latents but {len(prompts)} captions; give one per latent."
        )
    if latents is None and teacher is None:
        raise ValueError("`teacher` is required without `latents` (in-distribution targets).")
    ref = next(teacher.parameters()) if teacher is not None else latents
    cond = text_encoder.encode_prompts(list(prompts)).to(ref.device, ref.dtype)
    stream = seed + FINETUNE_SEED_OFFSET
    x0 = _noised_inputs(len(prompts), teacher, stream) if latents is None else latents
    batches = make_probe_batches(
        x0.to(ref.device, ref.dtype),
        cond,
        alphas_cumprod,
        batch_size=batch_size,
        seed=stream,
        draws=draws,
    )
    return teacher_targets(teacher, batches) if latents is None else batches


def forget_probes(
    text_encoder,
    prompts: Sequence[str],
    latents: torch.Tensor | None = None,
    *,
    base=None,
    sampler: SamplerProbe | None = None,
    alphas_cumprod: torch.Tensor,
    batch_size: int,
    seed: int,
    draws: int = 1,
) -> list[ProbeBatch]:
    """Frozen quadrature of the forget loss, target eps (seed ``seed + FORGET_SEED_OFFSET``).

    The forget data are ``latents`` (images of the erased concept, captioned by ``prompts``
    cyclically), or, without them, ``len(sampler.seeds)`` samples of the base model per prompt
    drawn with ``sampler``'s schedule (its prompt replaced by each forget prompt).

    Args:
      text_encoder: :class:`bridge.sd.TextEncoder`. prompts: erased-concept prompts.
      latents: ``(N, C, H, W)`` forget data, or None (then ``base`` and ``sampler`` are needed).
      base: UNet at theta_0. sampler: the DDIM settings and seeds for the base samples.
      alphas_cumprod: ``(num_train_timesteps,)``. batch_size, seed, draws: as for fine-tuning.

    Returns:
      Probe batches with target eps.

    Raises:
      ValueError: no prompts, or neither latents nor (base, sampler).
    """
    from bridge.generate import ddim_sample

    if not prompts:
        raise ValueError("`prompts` is empty: the forget loss needs the erased concept's prompt.")
    embeds = text_encoder.encode_prompts(list(prompts))
    if latents is None:
        if base is None or sampler is None:
            raise ValueError("without forget `latents`, give `base` and `sampler` to sample them.")
        images = [
            ddim_sample(
                base,
                embeds[i : i + 1],
                sampler.uncond,
                scheduler=sampler.scheduler(),
                seeds=list(sampler.seeds),
                steps=sampler.steps,
                guidance_scale=sampler.guidance_scale,
            )
            for i in range(len(prompts))
        ]
        latents = torch.cat(images)
        cond = embeds.repeat_interleave(len(sampler.seeds), dim=0)
    else:
        cond = embeds[torch.arange(len(latents)) % len(prompts)]
    ref = next(base.parameters()) if base is not None else latents
    return make_probe_batches(
        latents.to(ref.device, ref.dtype),
        cond.to(ref.device, ref.dtype),
        alphas_cumprod,
        batch_size=batch_size,
        seed=seed + FORGET_SEED_OFFSET,
        draws=draws,
    )


@dataclass(frozen=True)
class Probes:
    """Every frozen draw of one prediction and its measurement.

    Attributes:
      finetune: fine-tuning probe batches (the loss GD descends, and whose Hessian is measured).
      forget: forget probe batches, target eps (``forget_loss_recovery``, ``output_rho``).
      sampler: the erased prompt's sampler (presence), or None when presence is not measured.
      seed: the seed every draw was derived from.
    """

    finetune: list[ProbeBatch]
    forget: list[ProbeBatch]
    sampler: SamplerProbe | None
    seed: int
