r"""ESD (Gandikota et al. 2023): distil negative guidance into the UNet by fine-tuning.

Composition (theory.md s.3): target = negative guidance of the frozen original
(:func:`bridge.unlearning.targets.negative_guidance`, theory's ``negative_guidance``), mask =
cross-attention (ESD-x, ``xattn``) or everything but cross-attention, the time embedding and
``conv_out`` (ESD-u, ``noxattn``), solver = Adam. x_t comes from partially sampling the *current*
model with the concept prompt, as in rohitgandikota/erasing ``train-esd.py`` (defaults: lr 1e-5,
negative guidance 1, start guidance 3, DDIM 20 steps here; the official 1000 iterations are
``steps``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from bridge.unlearning.masks import PARAMETER_SETS

__all__ = ["ESD_MASKS", "esd", "esd_target", "partial_ddim"]

#: ESD variant -> predicate over parameter names (True = trained).
ESD_MASKS = {
    # ESD-x: cross-attention only (the official code's "xattn": names containing attn2)
    "x": PARAMETER_SETS["xattn"],
    # ESD-u: every non-cross-attention layer (official "noxattn": also skips time embedding, out)
    "u": PARAMETER_SETS["noxattn"],
}


def esd_target(eps_null: torch.Tensor, eps_concept: torch.Tensor, guidance: float) -> torch.Tensor:
    r"""ESD's negative-guidance target from the frozen original model.

    .. math::
        \epsilon^\star = \epsilon_0(x_t, \varnothing)
        - g\,(\epsilon_0(x_t, c_f) - \epsilon_0(x_t, \varnothing))

    >>> esd_target(torch.tensor([1.0]), torch.tensor([3.0]), 2.0)
    tensor([-3.])
    """
    return eps_null - guidance * (eps_concept - eps_null)


@torch.no_grad()
def partial_ddim(unet, ddim, x, cond, uncond, n_steps: int, guidance_scale: float):
    """Run the first ``n_steps`` DDIM steps from x_T with guidance; return (x_t, t)."""
    for t in ddim.timesteps[:n_steps]:
        both = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
        eu, ec = both.chunk(2)
        x = ddim.step(eu + guidance_scale * (ec - eu), t, x).prev_sample
    return x, ddim.timesteps[n_steps]


def esd(
    unet,
    text_encoder,
    scheduler,
    concepts: Sequence[str],
    *,
    variant: Literal["x", "u"] = "x",
    steps: int = 200,
    lr: float = 1e-5,
    guidance: float = 1.0,
    start_guidance: float = 3.0,
    ddim_steps: int = 20,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
):
    r"""ESD (Gandikota et al. 2023): fine-tune so that :math:`\epsilon_\theta(x_t, c_f)` follows
    :func:`esd_target` of the frozen original model.

    As in the official code, x_t comes from partially sampling the *current* model with the
    concept prompt (DDIM, guidance ``start_guidance``) to a random step; the loss is
    :math:`\|\epsilon_\theta(x_t, c_f) - \epsilon^\star\|^2`. ``variant="x"`` trains the
    cross-attention parameters (ESD-x), ``"u"`` every non-cross-attention layer (ESD-u).

    Args:
      unet: base UNet (not modified). text_encoder: :class:`bridge.sd.TextEncoder`.
      scheduler: training scheduler (its config builds the DDIM sampler).
      concepts: prompts to erase (one drawn per batch element; several at once allowed).
      variant: ``"x"`` or ``"u"``. steps, lr: Adam. guidance: negative guidance g.
      start_guidance, ddim_steps: how x_t is produced. batch_size: x_t per step.
      seed: seed of timesteps and starting noise.

    Returns:
      The unlearned copy (eval mode).

    Raises:
      ValueError: if ``concepts`` is empty or ``variant`` unknown.
    """
    from diffusers import DDIMScheduler

    if isinstance(concepts, str) or len(concepts) == 0:
        raise ValueError(f"`concepts` must be a non-empty list of prompts, got {concepts!r}.")
    if variant not in ESD_MASKS:
        raise ValueError(f"`variant` must be one of {sorted(ESD_MASKS)}, got {variant!r}.")
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    student = copy.deepcopy(unet).eval()
    trained = ESD_MASKS[variant]
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(trained(name))
        if trained(name):
            params.append(p)
    opt = torch.optim.Adam(params, lr=lr)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(ddim_steps)
    emb = text_encoder.encode_prompts(list(concepts) + [""]).to(next(unet.parameters()))
    cond_all, uncond = emb[:-1], emb[-1:]
    gen = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for _ in tqdm(range(steps), desc=f"esd-{variant}", disable=not progress):
        which = torch.randint(0, len(concepts), (batch_size,), generator=gen)
        cond = cond_all[which]
        u = uncond.expand(batch_size, -1, -1)
        n_steps = int(torch.randint(0, ddim_steps - 1, (1,), generator=gen))
        x = torch.randn((batch_size, *shape), generator=gen).to(cond)
        xt, t = partial_ddim(student, ddim, x, cond, u, n_steps, start_guidance)
        with torch.no_grad():
            both = frozen(torch.cat([xt, xt]), t, torch.cat([u, cond])).sample
            e0_null, e0_c = both.chunk(2)
            target = esd_target(e0_null, e0_c, guidance)
        pred = student(xt, t, cond).sample
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.requires_grad_(True).eval()
