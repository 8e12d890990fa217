r"""What the fine-tuning methods train on: forget/retain images, noisy batches, the training target.

Images are in the UNet's input space: pixels in [-1, 1] for the pixel-space testbed, VAE latents
(times the VAE scaling factor) for Stable Diffusion. A noisy batch draws (x_0, t, eps) with a
``torch.Generator`` only, so a method run is a function of its seed.

The regression target of the standard diffusion loss follows the base scheduler's
``prediction_type``: :math:`\epsilon` for ``"epsilon"``, the velocity
:math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0` (the scheduler's own
``get_velocity``) for ``"v_prediction"`` (SD 2.x-768).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "PREDICTION_TYPES",
    "NoisyBatch",
    "UnlearningData",
    "diffusion_loss",
    "generated_data",
    "noisy_batch",
    "prediction_type",
    "read_images",
    "to_model_space",
    "training_target",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    """The scheduler's ``prediction_type`` (``"epsilon"`` when the config has none).

    Raises:
      ValueError: for a type the unlearning losses do not implement (``"sample"``).
    """
    kind = getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type {kind!r} is not supported by the unlearning losses; "
            f"expected one of {', '.join(PREDICTION_TYPES)}."
        )
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """The diffusion loss's target for ``(x0, noise, t)``: eps or the scheduler's velocity."""
    if prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


class NoisyBatch(NamedTuple):
    """One draw of the forward process: x_0, eps, t, x_t and the row indices of the data."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    xt: torch.Tensor
    index: torch.Tensor


def noisy_batch(
    images: torch.Tensor,
    scheduler,
    gen: torch.Generator,
    batch_size: int,
    *,
    timesteps: torch.Tensor | None = None,
) -> NoisyBatch:
    """Draw ``batch_size`` rows of ``images`` (with replacement), t uniform (or given), eps ~ N(0, I).

    Args:
      images: x_0, ``(N, C, H, W)``.
      scheduler: supplies ``add_noise`` and ``num_train_timesteps``.
      gen: CPU generator (the only source of randomness).
      batch_size: rows per batch.
      timesteps: optional ``(batch_size,)`` timesteps instead of uniform ones.
    """
    n = images.shape[0]
    index = torch.randint(0, n, (batch_size,), generator=gen)
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen
        )
    noise = torch.randn((batch_size, *images.shape[1:]), generator=gen).to(images)
    x0 = images[index]
    t = timesteps.to(images.device)
    return NoisyBatch(x0, noise, t, scheduler.add_noise(x0, noise, t), index)


def diffusion_loss(unet, scheduler, batch: NoisyBatch, cond: torch.Tensor) -> torch.Tensor:
    r"""The standard loss :math:`\|\hat y_\theta(x_t, t, c) - y\|^2` (mean), y per prediction type.

    Squared error by hand (not ``F.mse_loss``), which keeps ``torch.func`` transforms working.
    """
    err = unet(batch.xt, batch.t, cond).sample - training_target(
        scheduler, batch.x0, batch.noise, batch.t
    )
    return (err * err).mean()


@dataclasses.dataclass(frozen=True)
class UnlearningData:
    """Forget and retain images with one prompt each (``forget_prompts`` are the erased ones).

    Attributes:
      forget_images: ``(N_f, C, H, W)`` images of the erased concept(s).
      forget_prompts: ``N_f`` prompts, each one of the erased prompts.
      retain_images: ``(N_r, C, H, W)`` images of concepts to keep (may be None).
      retain_prompts: ``N_r`` prompts.
    """

    forget_images: torch.Tensor
    forget_prompts: tuple[str, ...]
    retain_images: torch.Tensor | None = None
    retain_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "forget_prompts", tuple(self.forget_prompts))
        object.__setattr__(self, "retain_prompts", tuple(self.retain_prompts))
        if len(self.forget_prompts) == 0 or self.forget_images.shape[0] != len(self.forget_prompts):
            raise ValueError(
                f"forget data has {self.forget_images.shape[0]} images and "
                f"{len(self.forget_prompts)} prompts; give one prompt per image (at least one)."
            )
        n_r = 0 if self.retain_images is None else self.retain_images.shape[0]
        if n_r != len(self.retain_prompts):
            raise ValueError(
                f"retain data has {n_r} images and {len(self.retain_prompts)} prompts; "
                "give one prompt per image."
            )

    @property
    def has_retain(self) -> bool:
        return bool(self.retain_prompts)


@torch.no_grad()
def generated_data(
    unet,
    text_encoder,
    scheduler,
    erase: Sequence[str],
    preserve: Sequence[str] = (),
    *,
    per_prompt: int = 8,
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> UnlearningData:
    """Forget/retain data generated by the base model, as SalUn, EraseDiff and SHS do for SD.

    SalUn's NSFW recipe generates 800 images of "a photo of a nude person" as D_f and 800 of
    "a photo of a person wearing clothes" as D_r with SD v1.4; this is the same at any size.

    Args:
      unet, text_encoder, scheduler: the base pipeline's parts.
      erase: erased prompts (D_f). preserve: prompts to keep (D_r; may be empty).
      per_prompt: images per prompt. steps, guidance_scale: DDIM sampling.
      seed: image i of every prompt starts from seed ``seed + i``.
    """
    from bridge.generate import generate

    seeds = [seed + i for i in range(per_prompt)]
    prompts = list(erase) + list(preserve)
    images = generate(
        unet,
        text_encoder.encode_prompts,
        prompts,
        scheduler=scheduler,
        seeds=seeds,
        steps=steps,
        guidance_scale=guidance_scale,
    )
    ref = next(unet.parameters())
    flat = images.reshape(-1, *images.shape[2:]).to(ref)
    labels = [p for p in prompts for _ in seeds]
    n_f = len(erase) * per_prompt
    return UnlearningData(
        flat[:n_f],
        labels[:n_f],
        flat[n_f:] if preserve else None,
        labels[n_f:],
    )


def read_images(paths, size: int, mode: str = "RGB") -> torch.Tensor:
    """Images (or ``mode="L"`` masks) resized to ``size`` x ``size``, ``(n, C, size, size)`` in [-1, 1]."""
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as img:
            arr = np.asarray(img.convert(mode).resize((size, size), Image.BICUBIC), np.float32)
        out.append(torch.from_numpy(arr.reshape(size, size, -1)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def to_model_space(base_folder, images: torch.Tensor, unet) -> torch.Tensor:
    """Pixels in [-1, 1] -> the UNet's input space: VAE latents (times the scaling factor) when
    ``base_folder`` has a ``vae/``, the pixels themselves otherwise (the testbed)."""
    from pathlib import Path

    ref = next(unet.parameters())
    vae_dir = Path(base_folder) / "vae"
    if not vae_dir.is_dir():
        return images.to(ref)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(ref).eval()
    with torch.no_grad():
        latents = [
            vae.encode(images[i : i + 4].to(ref)).latent_dist.mean for i in range(0, len(images), 4)
        ]
    return torch.cat(latents) * vae.config.scaling_factor
