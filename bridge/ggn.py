r"""The generalised Gauss-Newton matrix of the frozen diffusion loss: the linearised network's Hessian.

For the squared error :math:`L(\theta) = \frac{1}{N_b}\sum_b \frac{1}{|y_b|}\|f_b(\theta) - y_b\|^2`,

.. math:: H = \underbrace{\frac{1}{N_b}\sum_b \frac{2}{|y_b|} J_b^\top J_b}_{G}
          + \frac{1}{N_b}\sum_b \frac{2}{|y_b|}\sum_j (f_{b,j} - y_{b,j}) \nabla^2 f_{b,j},

with :math:`J_b = \partial f_b / \partial\theta`. G is the exact Hessian of the loss of the
network linearised at theta, :math:`f(\theta') \approx f(\theta) + J (\theta' - \theta)` (the
model of neural-tangents / lazy training), so GD on the quadratic with Hessian G is GD on the
linearised network. It is positive semi-definite: unlike the Hessian's negative directions at a
UNet's theta_u, where GD on the local quadratic model grows geometrically, nothing diverges.
In the linear model of theory.md the output is linear in theta, the residual term vanishes and
G = H: the theory's law applies to either. G = H also wherever the residuals vanish (the
in-distribution loss at theta_0), which the tests use.

:class:`GGNOperator` has the interface of :class:`bridge.curvature.HessianOperator` that
:mod:`bridge.spectra` and :mod:`bridge.local_curvature` use (``@``, ``gradient()``,
``num_matvecs``, ``loss``): each product is one forward-mode JVP and one VJP per probe batch,
under the math SDPA kernel (fused attention kernels have no forward-mode rule).
"""

from __future__ import annotations

import torch
from curvlinops._torch_base import PyTorchLinearOperator
from torch.func import functional_call
from tqdm.auto import tqdm

from bridge.loss import FrozenDiffusionLoss, frozen_params

__all__ = ["GGNOperator"]


class GGNOperator(PyTorchLinearOperator):
    """Generalised Gauss-Newton matrix of a :class:`~bridge.loss.FrozenDiffusionLoss`, ``(n, n)``.

    Args:
      loss: the frozen loss (its group and probe batches). theta: flat parameters ``(n,)`` at
        which G is taken (default: the UNet's current ones).
      progress: tqdm bar over matrix-vector products.

    Attributes:
      num_matvecs: GGN-vector products computed so far.
    """

    SELF_ADJOINT = True

    def __init__(
        self, loss: FrozenDiffusionLoss, theta: torch.Tensor | None = None, *, progress=False
    ):
        n = loss.numel
        super().__init__([(n,)], [(n,)])
        self.loss = loss
        self.theta = (loss.theta() if theta is None else theta).detach().to(loss.device, loss.dtype)
        self.num_matvecs = 0
        self._bar = tqdm(desc="GGN-vector products", unit="GVP", disable=not progress)

    @property
    def device(self) -> torch.device:
        """Device of the UNet and of the vectors."""
        return self.loss.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the UNet and of the vectors."""
        return self.loss.dtype

    def _output(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        b = self.loss.batches[index]
        return functional_call(
            self.loss.unet,
            self.loss.group.unflatten(flat),
            (b.noisy, b.timesteps),
            {"encoder_hidden_states": b.cond},
        ).sample

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        """Curvlinops hook: ``X = [V]`` with V ``(n, K)``; returns ``[G V]``."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        (columns,) = X
        out = torch.zeros_like(columns)
        with sdpa_kernel(SDPBackend.MATH), frozen_params(self.loss.unet), torch.no_grad():
            for i in range(len(self.loss.batches)):
                f = lambda flat, i=i: self._output(flat, i)  # noqa: E731
                value, pullback = torch.func.vjp(f, self.theta)
                for k, v in enumerate(columns.T):
                    _, jv = torch.func.jvp(f, (self.theta,), (v,))
                    out[:, k] += pullback(2.0 * jv / value.numel())[0]
        out = out / len(self.loss.batches)
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"non-finite GGN-vector product for group {self.loss.group.spec!r}; use float32/64"
            )
        self.num_matvecs += columns.shape[1]
        self._bar.update(columns.shape[1])
        return [out]

    def gradient(self) -> torch.Tensor:
        """grad L(theta) (the loss's, not the linearised one's: they agree at theta), ``(n,)``."""
        return self.loss.gradient(self.theta)
