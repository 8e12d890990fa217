"""Image generation for presence metrics: a direct DDIM loop over a UNet, or a diffusers pipeline.

Every image is drawn from its own seed (``seeds[i]`` fixes the starting noise of image ``i``), so
the same seed list gives the same starting noise for every model compared (base, unlearned,
fine-tuned) and presence differences come from the weights alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ddim_sample", "generate", "generate_with_pipeline", "initial_noise"]


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Starting noise x_T, one CPU generator per seed: shape ``(len(seeds), *shape)``."""
    if len(seeds) == 0:
        raise ValueError("`seeds` is empty; give at least one seed per image to generate.")
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def ddim_sample(
    unet,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    scheduler,
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
) -> torch.Tensor:
    r"""Deterministic DDIM (eta = 0) with classifier-free guidance, straight over the UNet.

    .. math::
        \hat\epsilon = \epsilon(x_t, \varnothing)
        + s\,(\epsilon(x_t, c) - \epsilon(x_t, \varnothing))

    Args:
      unet: ``UNet2DConditionModel`` (epsilon prediction).
      cond: prompt embeddings, shape ``(n, seq, dim)`` (one per image) or ``(1, seq, dim)``.
      uncond: null-prompt embedding, shape ``(1, seq, dim)``.
      scheduler: any diffusers scheduler; its config builds the DDIM sampler.
      seeds: one seed per image; ``len(seeds)`` images are generated.
      steps: DDIM steps. guidance_scale: s (1 = no guidance).
      batch_size: images per UNet call.

    Returns:
      Samples, shape ``(n, C, H, W)`` in the model's space (pixels in [-1, 1] for the testbed,
      latents for SD), float32 on CPU.
    """
    from diffusers import DDIMScheduler

    n = len(seeds)
    if cond.shape[0] not in (1, n):
        raise ValueError(f"`cond` has {cond.shape[0]} embeddings for {n} seeds; give 1 or {n}.")
    cond = cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    param = next(unet.parameters())
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    was_training = unet.training
    unet.eval()
    for start in range(0, n, batch_size):
        x = initial_noise(seeds[start : start + batch_size], shape).to(param)
        x = x * ddim.init_noise_sigma
        c = cond[start : start + batch_size].to(param)
        b = x.shape[0]
        u = uncond.to(param).expand(b, *uncond.shape[1:])
        for t in ddim.timesteps:
            if guidance_scale == 1.0:
                eps = unet(x, t, c).sample
            else:
                both = unet(torch.cat([x, x]), t, torch.cat([u, c])).sample
                eps_u, eps_c = both.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = ddim.step(eps, t, x).prev_sample
        out.append(x.float().cpu())
    unet.train(was_training)
    return torch.cat(out)


def generate(
    unet,
    encode_prompts,
    prompts: Sequence[str],
    *,
    scheduler,
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 3.0,
) -> torch.Tensor:
    """Generate ``len(seeds)`` images for each prompt with :func:`ddim_sample`.

    Args:
      unet: the UNet. encode_prompts: callable ``list[str] -> (B, seq, dim)`` embeddings
        (e.g. ``TextEncoder.encode_prompts``).
      prompts: prompts (non-empty list). seeds: seed list reused for every prompt.
      scheduler, steps, guidance_scale: as in :func:`ddim_sample`.

    Returns:
      Images, shape ``(len(prompts), len(seeds), C, H, W)``.

    Raises:
      ValueError: if ``prompts`` is empty.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
    embeds = encode_prompts(list(prompts) + [""])
    uncond = embeds[-1:]
    images = [
        ddim_sample(
            unet,
            embeds[i : i + 1],
            uncond,
            scheduler=scheduler,
            seeds=seeds,
            steps=steps,
            guidance_scale=guidance_scale,
        )
        for i in range(len(prompts))
    ]
    return torch.stack(images)


def generate_with_pipeline(
    pipeline,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 7.5,
) -> torch.Tensor:
    """Generate with a diffusers ``StableDiffusionPipeline`` (real checkpoints, GPU recipe).

    Args:
      pipeline: a loaded ``StableDiffusionPipeline`` (safety checker as the user configured it).
      prompts: prompts (non-empty). seeds: one generator per image, reused for every prompt.
      steps, guidance_scale: passed to the pipeline.

    Returns:
      Images in [-1, 1], shape ``(len(prompts), len(seeds), 3, H, W)``, float32 on CPU.

    Raises:
      ValueError: if ``prompts`` or ``seeds`` is empty.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
    if len(seeds) == 0:
        raise ValueError("`seeds` is empty; give at least one seed per image to generate.")
    out = []
    for prompt in prompts:
        gens = [torch.Generator(device=pipeline.device).manual_seed(int(s)) for s in seeds]
        imgs = pipeline(
            [prompt] * len(seeds),
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="pt",
        ).images
        out.append(imgs.float().cpu() * 2 - 1)
    return torch.stack(out)
