r"""The frozen diffusion loss of a UNet as a function of one parameter group's flat vector.

Every operator built on it (gradient, Hessian-vector product, Lanczos) must be a deterministic
function of theta, so the Monte-Carlo quadrature of the diffusion loss is drawn once and frozen:
a list of :class:`ProbeBatch` of (x0 latents, eps noise, timestep t, text embedding c, target).

.. math:: L(\theta) = \frac{1}{N_b} \sum_b \frac{1}{|b|} \sum_{j \in b}
          \frac{1}{D}\|\hat\epsilon_\theta(\alpha_{t_j} x_{0,j} + \sigma_{t_j}\epsilon_j, t_j, c_j)
          - y_j\|^2

with D the number of latent entries per sample, :math:`\alpha_t^2 = \bar\alpha_t` of the
scheduler, and target :math:`y_j = \epsilon_j` (denoising loss on data) or
:math:`y_j = \hat\epsilon_{\theta_0}(x_{t,j}, t_j, c_j)` (the base model's own prediction: the
*in-distribution* loss of theory.md s.4, whose gradient vanishes at theta_0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.func import functional_call

from bridge.groups import ParameterGroup

__all__ = [
    "FrozenDiffusionLoss",
    "ProbeBatch",
    "frozen_params",
    "make_probe_batches",
    "teacher_targets",
]


@dataclass(frozen=True)
class ProbeBatch:
    """One frozen quadrature batch of the diffusion loss.

    Attributes:
      noisy: x_t, shape ``(B, C, H, W)``.
      timesteps: t, shape ``(B,)`` (long, scheduler steps in [0, num_train_timesteps)).
      cond: text embeddings c, shape ``(B, seq, dim)``.
      target: regression target y, shape ``(B, C, H, W)`` (eps or a teacher prediction).
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor

    def to(self, device=None, dtype=None) -> ProbeBatch:
        """Move to ``device``; floating tensors also to ``dtype``."""
        return ProbeBatch(
            noisy=self.noisy.to(device=device, dtype=dtype),
            timesteps=self.timesteps.to(device=device),
            cond=self.cond.to(device=device, dtype=dtype),
            target=self.target.to(device=device, dtype=dtype),
        )


def make_probe_batches(
    latents: torch.Tensor,
    cond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    draws: int = 1,
    t_range: tuple[int, int] | None = None,
) -> list[ProbeBatch]:
    """Draw the frozen (timestep, noise) quadrature for the denoising loss on given data.

    Args:
      latents: x0, shape ``(N, C, H, W)`` (VAE latents already scaled, or tiny-testbed images).
      cond: text embeddings per sample, shape ``(N, seq, dim)`` (or ``(1, seq, dim)``, broadcast).
      alphas_cumprod: scheduler's cumulative alphas, shape ``(num_train_timesteps,)``.
      batch_size: samples per probe batch.
      seed: seed of the torch generator for t and eps (same seed -> identical batches).
      draws: independent (t, eps) draws per data point (quadrature size multiplier).
      t_range: half-open range of timesteps ``[lo, hi)``; default the whole schedule.

    Returns:
      List of :class:`ProbeBatch` with target = eps, covering ``draws * N`` samples.

    Raises:
      ValueError: if shapes disagree or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    n = latents.shape[0]
    if cond.shape[0] not in (1, n):
        raise ValueError(f"`cond` has {cond.shape[0]} rows, expected 1 or {n} (one per latent)")
    cond = cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    lo, hi = t_range or (0, alphas_cumprod.shape[0])
    gen = torch.Generator().manual_seed(seed)
    x0 = latents.repeat(draws, 1, 1, 1)
    c = cond.repeat(draws, 1, 1)
    t = torch.randint(lo, hi, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(latents.dtype)
    acp = alphas_cumprod.to(torch.float64)[t].reshape(-1, 1, 1, 1)
    noisy = (acp.sqrt() * x0.double() + (1 - acp).sqrt() * eps.double()).to(latents.dtype)
    return [
        ProbeBatch(
            noisy[i : i + batch_size],
            t[i : i + batch_size],
            c[i : i + batch_size],
            eps[i : i + batch_size],
        )
        for i in range(0, x0.shape[0], batch_size)
    ]


@torch.no_grad()
def teacher_targets(unet, batches: Sequence[ProbeBatch]) -> list[ProbeBatch]:
    """Replace each batch's target by ``unet``'s own prediction (the in-distribution target).

    Args:
      unet: the teacher, usually the base UNet at theta_0 (eval mode).
      batches: probe batches.

    Returns:
      New batches with ``target = unet(noisy, t, cond).sample``.
    """
    return [
        replace(b, target=unet(b.noisy, b.timesteps, encoder_hidden_states=b.cond).sample)
        for b in batches
    ]


@contextlib.contextmanager
def frozen_params(module: torch.nn.Module):
    """Temporarily set requires_grad=False so autograd builds no graph for the other weights."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class FrozenDiffusionLoss:
    """Deterministic diffusion loss L(theta_group) over frozen probe batches.

    The UNet's other parameters stay fixed; the group is passed as one flat vector through
    ``torch.func.functional_call``, so ``torch.func.grad``/``jvp`` apply directly.

    Args:
      unet: ``UNet2DConditionModel`` (put in eval mode here: dropout would unfreeze the loss).
      group: the parameter group theta ranges over.
      batches: frozen :class:`ProbeBatch` list (moved to the UNet's device and dtype).

    Raises:
      ValueError: if ``batches`` is empty.
    """

    def __init__(self, unet, group: ParameterGroup, batches: Sequence[ProbeBatch]):
        if not batches:
            raise ValueError("`batches` is empty: the loss needs at least one probe batch")
        self.unet = unet.eval()
        self.group = group
        ref = next(unet.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.batches = [b.to(self.device, self.dtype) for b in batches]

    @property
    def numel(self) -> int:
        """Length n of the flat parameter vector."""
        return self.group.numel

    def theta(self) -> torch.Tensor:
        """Current group parameters of the UNet, flat ``(n,)`` (detached)."""
        return self.group.values(self.unet)

    def batch_loss(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Loss of batch ``index`` at group parameters ``flat`` ``(n,)``; scalar tensor."""
        b = self.batches[index]
        out = functional_call(
            self.unet,
            self.group.unflatten(flat),
            (b.noisy, b.timesteps),
            {"encoder_hidden_states": b.cond},
        ).sample
        # Squared error by hand: F.mse_loss has no forward-mode rule under jvp(grad(...)).
        err = out - b.target
        return (err * err).mean()

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Full loss L(theta) = mean over batches; scalar tensor."""
        return sum(self.batch_loss(flat, i) for i in range(len(self.batches))) / len(self.batches)

    def gradient(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """grad L at ``flat`` (default: current parameters), flat ``(n,)``, summed per batch."""
        flat = (self.theta() if flat is None else flat).detach()
        total = torch.zeros_like(flat)
        with frozen_params(self.unet), torch.no_grad():
            for i in range(len(self.batches)):
                total += torch.func.grad(self.batch_loss)(flat, i)
        return total / len(self.batches)

    def batch_gradients(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """Per-batch gradients at ``flat``, ``(N_b, n)``; rows average to :meth:`gradient`."""
        flat = (self.theta() if flat is None else flat).detach()
        with frozen_params(self.unet), torch.no_grad():
            return torch.stack(
                [torch.func.grad(self.batch_loss)(flat, i) for i in range(len(self.batches))]
            )

    def value(self, flat: torch.Tensor | None = None) -> float:
        """L at ``flat`` (default: current parameters) as a Python float, without autograd."""
        flat = self.theta() if flat is None else flat
        with torch.no_grad():
            return float(self(flat))
