r"""Deterministic DDIM as a differentiable function of one parameter group (presence readouts).

:func:`sample_at` draws the same images as :func:`bridge.generate.ddim_sample` (same x_T seeds,
same ``DDIMScheduler`` step, same classifier-free guidance) but with the group's parameters passed
as a flat vector through ``torch.func.functional_call``, so that

.. math:: \frac{\partial}{\partial\theta}\,
          \frac{1}{n}\sum_i \log p_f\big(x_0^{(i)}(\theta)\big)

is one backward pass through every sampler step. With ``checkpoint=True`` each step's
activations are recomputed in the backward pass instead of stored (torch.utils.checkpoint): the
memory of one UNet call instead of ``steps`` of them, which is what lets an SD-size UNet fit on
one GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from bridge.generate import initial_noise
from bridge.groups import ParameterGroup
from bridge.probes import SamplerProbe

__all__ = ["presence_scores", "sample_at"]


def sample_at(
    unet,
    group: ParameterGroup,
    flat: torch.Tensor,
    probe: SamplerProbe,
    *,
    seeds: slice = slice(None),
    checkpoint: bool = False,
) -> torch.Tensor:
    """DDIM samples of ``probe``'s prompt with the group set to ``flat``; differentiable in it.

    Args:
      unet: ``UNet2DConditionModel`` (eval mode). group: the parameter group ``flat`` fills.
      flat: group parameters ``(n,)`` (may require grad).
      probe: prompt, seeds, steps, guidance and scheduler.
      seeds: which of ``probe.seeds`` to draw (a slice: chunks for SD-size models).
      checkpoint: recompute each sampler step in the backward pass (gradient checkpointing).

    Returns:
      Samples ``(m, C, H, W)`` in the UNet's dtype and device (m seeds of the slice).
    """
    ddim = probe.scheduler()
    ref = next(unet.parameters())
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    chosen = list(probe.seeds)[seeds]
    # As ddim_sample: float32 CPU noise per seed, then moved to the UNet's device and dtype.
    x = initial_noise(chosen, shape).to(ref) * ddim.init_noise_sigma
    b = x.shape[0]
    cond = probe.cond.to(ref).expand(b, *probe.cond.shape[1:])
    uncond = probe.uncond.to(ref).expand(b, *probe.uncond.shape[1:])
    scale = float(probe.guidance_scale)

    def step(t, x_t, params):
        values = group.unflatten(params)
        if scale == 1.0:
            eps = functional_call(unet, values, (x_t, t), {"encoder_hidden_states": cond}).sample
        else:
            both = functional_call(
                unet,
                values,
                (torch.cat([x_t, x_t]), t),
                {"encoder_hidden_states": torch.cat([uncond, cond])},
            ).sample
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        return ddim.step(eps, t, x_t).prev_sample

    for t in ddim.timesteps:
        if checkpoint and flat.requires_grad:
            x = torch_checkpoint(step, t, x, flat, use_reentrant=False)
        else:
            x = step(t, x, flat)
    return x


def presence_scores(
    log_probs: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, concept: int
) -> torch.Tensor:
    """log p(concept | image) per image from a classifier hook, ``(m,)``, differentiable.

    Args:
      log_probs: ``images (m, C, H, W) -> (m, K)`` log-probabilities (rows logsumexp to 0).
      images: samples. concept: class index of the erased concept.

    Returns:
      ``(m,)`` log-probabilities (nats).

    Raises:
      ValueError: a hook output that is not ``(m, K)`` log-probabilities, or ``concept`` out of
        range.
    """
    out = log_probs(images)
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(
            f"`log_probs` returned shape {tuple(out.shape)}; expected ({images.shape[0]}, K)."
        )
    if not 0 <= concept < out.shape[1]:
        raise ValueError(f"`concept` {concept} is out of range for {out.shape[1]} classes.")
    total = torch.logsumexp(out.detach().double(), dim=-1)
    if not torch.allclose(total, torch.zeros_like(total), atol=1e-4):
        raise ValueError(
            "`log_probs` rows do not logsumexp to 0: return log-probabilities "
            "(e.g. torch.log_softmax(logits, -1)), not logits."
        )
    return out[:, concept]
