r"""The Hessian of the frozen diffusion loss as a linear operator, and what is read off it.

:class:`HessianOperator` subclasses curvlinops' ``PyTorchLinearOperator`` (``@``, ``.to_scipy()``,
``SELF_ADJOINT``). curvlinops' own ``HessianLinearOperator`` is not used: it re-evaluates the
model under ``jvp(jacrev)`` in ``no_grad`` and fails on a diffusers UNet (architecture.md). What
this module adds: the frozen diffusion quadrature as data, a Hessian-vector product that works
through diffusers attention (automatic fallback to the math SDPA kernel, then the classic
processor), a central finite-difference HVP for memory-bounded runs, and a determinism check
whose message lists our likely causes and fixes. Spectra: :mod:`bridge.spectra`.

.. math:: (Hv)_b = \nabla_\theta \langle \nabla_\theta L_b(\theta), v \rangle,
          \quad H v = \frac{1}{N_b}\sum_b (H v)_b
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from curvlinops._torch_base import PyTorchLinearOperator
from tqdm.auto import tqdm

from bridge.loss import FrozenDiffusionLoss, frozen_params
from bridge.spectra import (  # re-exported: the operator and what is read off it, in one place
    Eigenpairs,
    curvature_along,
    dense_hessian,
    hutchpp_trace,
    spectral_density,
    spectrum_ends,
    top_eigenpairs,
)

__all__ = [
    "HVP_METHODS",
    "Eigenpairs",
    "curvature_along",
    "dense_hessian",
    "hutchpp_trace",
    "spectral_density",
    "spectrum_ends",
    "top_eigenpairs",
    "HessianOperator",
    "NonDeterministicError",
]

HvpMethod = Literal["double-backward", "forward-over-reverse", "finite-difference"]
#: Hessian-vector product implementations. ``double-backward`` is the default: it measured
#: ~2x a gradient on the tiny UNet against 4-5x for ``forward-over-reverse`` (benchmarks/).
HVP_METHODS: tuple[str, ...] = HvpMethod.__args__
_FALLBACKS = ("sdpa-math", "classic-processor")


class NonDeterministicError(RuntimeError):
    """Two evaluations of the same operator at the same input disagreed."""


def _is_attention_ad_failure(err: Exception) -> bool:
    msg = str(err).lower()
    return isinstance(err, NotImplementedError | RuntimeError) and (
        "forward ad" in msg or "derivative for" in msg or "not implemented" in msg
    )


class HessianOperator(PyTorchLinearOperator):
    """Hessian of a :class:`~bridge.loss.FrozenDiffusionLoss` at theta, shape ``(n, n)``.

    Args:
      loss: the frozen loss (defines the parameter group and the probe batches).
      theta: flat parameters ``(n,)`` at which H is taken (default: the UNet's current ones).
      method: one of :data:`HVP_METHODS`. ``finite-difference`` uses
        ``(grad(theta + h v) - grad(theta - h v)) / 2h``: two gradients, no second-order graph.
      fd_step: relative step of the finite difference (default: cube root of machine epsilon).
      check_deterministic: run :meth:`check_deterministic` once at construction.
      batch_indices: the probe batches this operator sums (default all); with ``all_reduce``
        this shards the batches over processes (see :mod:`bridge.parallel`).
      all_reduce: in-place sum of a tensor over processes (default: none).
      progress: tqdm bar over matrix-vector products.

    Attributes:
      num_matvecs: Hessian-vector products computed so far.
      attention_fallback: None, ``"sdpa-math"`` or ``"classic-processor"`` once engaged.

    Raises:
      ValueError: for an unknown ``method``.
      NonDeterministicError: if ``check_deterministic`` finds differing evaluations.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        loss: FrozenDiffusionLoss,
        theta: torch.Tensor | None = None,
        *,
        method: HvpMethod = "double-backward",
        fd_step: float | None = None,
        check_deterministic: bool = True,
        batch_indices: Sequence[int] | None = None,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        progress: bool = False,
    ):
        if method not in HVP_METHODS:
            raise ValueError(f"`method` must be one of {HVP_METHODS}, got {method!r}")
        n = loss.numel
        super().__init__([(n,)], [(n,)])
        self.loss = loss
        self.theta = (loss.theta() if theta is None else theta).detach().to(loss.device, loss.dtype)
        self.method = method
        self.fd_step = fd_step or float(torch.finfo(loss.dtype).eps) ** (1 / 3)
        self.batch_indices = (
            list(range(len(loss.batches))) if batch_indices is None else list(batch_indices)
        )
        self.all_reduce = all_reduce
        self.num_matvecs = 0
        self.attention_fallback: str | None = None
        self._bar = tqdm(desc="Hessian-vector products", unit="HVP", disable=not progress)
        if check_deterministic:
            self.check_deterministic()

    @property
    def device(self) -> torch.device:
        """Device of the UNet and of the vectors."""
        return self.loss.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the UNet and of the vectors."""
        return self.loss.dtype

    # -- products ------------------------------------------------------------------------------
    def _attention_context(self):
        if self.attention_fallback == "sdpa-math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _engage_fallback(self, err: Exception) -> None:
        """Step to the next attention fallback, or re-raise when none is left."""
        done = _FALLBACKS.index(self.attention_fallback) + 1 if self.attention_fallback else 0
        if done >= len(_FALLBACKS):
            raise err
        self.attention_fallback = _FALLBACKS[done]
        if self.attention_fallback == "classic-processor":
            from diffusers.models.attention_processor import AttnProcessor

            self.loss.unet.set_attn_processor(AttnProcessor())
        warnings.warn(
            f"attention cannot be differentiated twice here ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}); switching to {self.attention_fallback}",
            stacklevel=3,
        )

    def _batch_hvp(self, index: int, columns: torch.Tensor) -> torch.Tensor:
        """(H_b V) for batch ``index`` and ``columns`` of shape ``(n, K)``; returns ``(n, K)``."""
        f = self.loss.batch_loss
        if self.method == "finite-difference":
            out = []
            scale = max(1.0, float(self.theta.norm()))
            for v in columns.T:
                h = self.fd_step * scale / max(float(v.norm()), 1e-300)
                gp = torch.func.grad(f)(self.theta + h * v, index)
                gm = torch.func.grad(f)(self.theta - h * v, index)
                out.append((gp - gm) / (2 * h))
            return torch.stack(out, dim=1)
        if self.method == "forward-over-reverse":
            g = torch.func.grad(f)
            cols = [
                torch.func.jvp(lambda x: g(x, index), (self.theta,), (v,))[1] for v in columns.T
            ]
            return torch.stack(cols, dim=1)
        with torch.enable_grad():  # one graph of the gradient per batch, reused for every column
            x = self.theta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(f(x, index), x, create_graph=True)
            cols = [
                torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True)[0]
                for v in columns.T
            ]
        return torch.stack(cols, dim=1)

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        """Curvlinops hook: ``X = [V]`` with V ``(n, K)``; returns ``[H V]``."""
        (columns,) = X
        while True:
            try:
                with self._attention_context(), frozen_params(self.loss.unet), torch.no_grad():
                    total = sum(self._batch_hvp(i, columns) for i in self.batch_indices)
                break
            except (NotImplementedError, RuntimeError) as err:
                if not _is_attention_ad_failure(err) or self.method == "finite-difference":
                    raise
                self._engage_fallback(err)
        if not torch.is_tensor(total):  # no local batches on this process
            total = torch.zeros_like(columns)
        if self.all_reduce is not None:
            self.all_reduce(total)
        total = (
            total / len(self.loss.batches)
            if self.all_reduce is None
            else total / self._global_batches()
        )
        if not torch.isfinite(total).all():
            raise FloatingPointError(
                f"non-finite Hessian-vector product ({int((~torch.isfinite(total)).sum())} of "
                f"{total.numel()} entries) for group {self.loss.group.spec!r}; check the loss is "
                "finite at theta (float16 overflow? diverged weights?) and use float32/float64"
            )
        self.num_matvecs += columns.shape[1]
        self._bar.update(columns.shape[1])
        return [total]

    def _global_batches(self) -> int:
        """Number of batches over all processes (one all-reduce, then cached)."""
        if getattr(self, "_num_global", None) is None:
            count = torch.tensor([float(len(self.batch_indices))], dtype=torch.float64)
            self.all_reduce(count)
            self._num_global = int(count.item())
        return self._num_global

    def gradient(self) -> torch.Tensor:
        """grad L(theta) over this operator's batches (all-reduced), flat ``(n,)``."""
        with frozen_params(self.loss.unet), torch.no_grad():
            total = sum(
                torch.func.grad(self.loss.batch_loss)(self.theta, i) for i in self.batch_indices
            )
        total = torch.zeros_like(self.theta) if not torch.is_tensor(total) else total
        if self.all_reduce is None:
            return total / len(self.loss.batches)
        self.all_reduce(total)
        return total / self._global_batches()

    # -- determinism ---------------------------------------------------------------------------
    def check_deterministic(self, *, seed: int = 0, rtol: float | None = None) -> None:
        """Evaluate the loss and one Hessian-vector product twice and require agreement.

        Args:
          seed: seed of the random test vector. rtol: relative tolerance (default 1e3 machine
            epsilon of the dtype: reductions may reorder, a resampled loss differs at O(1)).

        Raises:
          NonDeterministicError: naming the quantity, the size of the difference and the fixes.
          FloatingPointError: if the loss is not finite.
        """
        rtol = rtol if rtol is not None else 1e3 * float(torch.finfo(self.dtype).eps)
        with torch.no_grad():
            values = [
                sum(float(self.loss.batch_loss(self.theta, i)) for i in self.batch_indices)
                for _ in range(2)
            ]
        if not np.isfinite(values[0]):
            raise FloatingPointError(
                f"non-finite diffusion loss ({values[0]}) at theta for group "
                f"{self.loss.group.spec!r}"
            )
        _compare("diffusion loss", torch.tensor(values[0]), torch.tensor(values[1]), rtol)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.shape[0], generator=gen, dtype=torch.float64).to(
            self.device, self.dtype
        )
        first, second = self @ v, self @ v
        _compare("Hessian-vector product", first, second, rtol)


def _compare(quantity: str, a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) or 1.0
    if diff > rtol * scale:
        raise NonDeterministicError(
            f"{quantity} differs between two evaluations at the same theta: max |difference| = "
            f"{diff:.3e} (relative {diff / scale:.3e} > rtol {rtol:.1e}). Likely causes here: "
            "(1) noise or timesteps re-drawn on every call -> freeze them once with "
            "bridge.loss.make_probe_batches(seed=...); "
            "(2) the UNet in train mode, so dropout is active -> call unet.eval(); "
            "(3) non-deterministic attention/cuDNN kernels -> "
            "torch.use_deterministic_algorithms(True) "
            "and the math SDPA backend, or run in float64."
        )
