r"""The determinism check of a :class:`~bridge.curvature.HessianOperator`, with a derived tolerance.

Every spectrum and prediction assumes the operator is a fixed function of theta. The check
evaluates the diffusion loss twice and one Hessian-vector product twice (under ``graph-reuse``
the second one through freshly built graphs, so a graph that froze one random draw cannot hide a
loss that re-draws on every call) and compares them against a tolerance per dtype:

.. math:: \mathrm{rtol} = \max(8\,\epsilon,\; 4\,f), \qquad
          f = \frac{\max|H_b v - (H_b(v + w) - H_b w)|}{\max|H_b v|}

with :math:`\epsilon` the dtype's machine epsilon and f the measured round-off floor of one
product: its linearity defect in ONE frozen first-order graph (nothing random is re-drawn
between the three products, so an operator that does re-draw cannot inflate its own tolerance).
For ``finite-difference`` the floor is the round-off of a gradient amplified by the step,
:math:`f = \epsilon \max|g| / (h \max|Hv|)`.

Where the constants come from (tiny UNet, cross-attention groups of 128 to 2,216 parameters,
batches of 2 and 4, all non-trivial sample orders; benchmarks/bench_bridge_curvature.py
re-measures them): a permuted but equivalent reduction order changes H v by at most 3.0 eps
(float64 and float32) and not at all in bfloat16 / float16 (both orders accumulate in float32
and round to the same value), so that spread cannot serve as the floor in half precision; the
linearity defect is 0.5 to 17 eps. 8 eps is 2.6x the largest reordering spread; 4 f covers
operators whose own rounding is larger (low-precision accumulation, cancellation), measured where
it arises. Measured rtol (bench): 3.5e-15, 1.4e-6, 6.3e-2 and 7.8e-3 for float64, float32,
bfloat16 and float16 (the old 1e3 eps was 7.8 in bfloat16: it could not fail). Real
non-determinism lands far above: re-drawn (t, eps) moves H v by 17x (bfloat16) to 3e14x
(float64) rtol, train-mode dropout (p = 0.1) by 4.2x to 7e13x. The loss, a mean of positive
terms, gets 8 eps (measured reordering spread <= 1 eps in every dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bridge.curvature import HessianOperator

__all__ = ["DeterminismReport", "NonDeterministicError", "check_operator_determinism", "rtol_for"]

#: rtol >= EPS_MULTIPLE * eps: a few ulps, 2.6x the largest measured reordering spread.
EPS_MULTIPLE = 8.0
#: rtol >= FLOOR_MULTIPLE * (measured round-off floor of one product).
FLOOR_MULTIPLE = 4.0


class NonDeterministicError(RuntimeError):
    """Two evaluations of the same operator at the same input disagreed."""


@dataclass(frozen=True)
class DeterminismReport:
    """What the determinism check measured (all differences relative to the largest entry).

    Attributes:
      dtype: the operator's dtype, e.g. ``"torch.bfloat16"``.
      loss_difference, loss_rtol: ``|L_1 - L_2| / |L_1|`` and its tolerance.
      hvp_difference, hvp_rtol: ``max|Hv_1 - Hv_2| / max|Hv_1|`` and its tolerance.
      noise_floor: measured round-off floor f of one product (see the module docstring).
      floor_kind: ``"linearity defect"`` or ``"finite-difference round-off"``.
    """

    dtype: str
    loss_difference: float
    loss_rtol: float
    hvp_difference: float
    hvp_rtol: float
    noise_floor: float
    floor_kind: str


def rtol_for(dtype: torch.dtype, noise_floor: float = 0.0) -> float:
    """Tolerance ``max(8 eps, 4 noise_floor)`` of the check for ``dtype``.

    Args:
      dtype: floating dtype of the operator. noise_floor: measured relative round-off floor.

    Returns:
      The relative tolerance on the largest entry.

    >>> rtol_for(torch.bfloat16)
    0.0625
    """
    return max(EPS_MULTIPLE * float(torch.finfo(dtype).eps), FLOOR_MULTIPLE * noise_floor)


def _message(op: HessianOperator, quantity: str, diff: float, rel: float, rtol: float, why: str):
    seen = []
    if op.loss.unet.training:
        seen.append("the UNet IS in train mode now")
    if not torch.are_deterministic_algorithms_enabled():
        seen.append("torch.use_deterministic_algorithms is off")
    return (
        f"{quantity} differs between two evaluations at the same theta: max |difference| = "
        f"{diff:.3e}, relative {rel:.3e} > rtol {rtol:.2e} ({why}, {op.dtype}). Likely causes "
        "here, with fixes: (1) noise or timesteps re-drawn on every call -> draw them once "
        "with bridge.loss.make_probe_batches(seed=...) and give those frozen batches to "
        "FrozenDiffusionLoss; (2) the UNet in train mode, so dropout is active -> call "
        "unet.eval() after any .train() (FrozenDiffusionLoss sets eval mode only when it is "
        "built); (3) non-deterministic attention or convolution kernels -> "
        "torch.use_deterministic_algorithms(True) (on CUDA with "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8), torch.backends.cudnn.benchmark = False and the math "
        "SDPA kernel (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), or float32/float64 "
        "instead of half precision." + (f" Seen here: {'; '.join(seen)}." if seen else "")
    )


def _summed(op: HessianOperator, values: list[float]) -> list[float]:
    """Sum per-process values over processes, so every process takes the same decision."""
    if op.all_reduce is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    op.all_reduce(t)
    return t.tolist()


def _linearity_defect(op: HessianOperator, v: torch.Tensor, w: torch.Tensor) -> float:
    """max|H_b v - (H_b (v + w) - H_b w)| / max|H_b v| in one frozen graph (0 without batches)."""
    products = op.one_graph_products([v, v + w, w])
    if not products:
        return 0.0
    hv, hvw, hw = products
    return float((hv - (hvw - hw)).abs().max()) / (float(hv.abs().max()) or 1.0)


def check_operator_determinism(op: HessianOperator, *, seed: int = 0) -> DeterminismReport:
    """Evaluate the loss and one Hessian-vector product twice each and require agreement.

    Args:
      op: the operator. seed: seed of the random test vectors v and w.

    Returns:
      :class:`DeterminismReport`.

    Raises:
      NonDeterministicError: naming the quantity, the size of the difference, the tolerance
        and its derivation, the likely causes and their fixes.
      FloatingPointError: if the loss is not finite.
    """
    eps = float(torch.finfo(op.dtype).eps)
    with torch.no_grad():
        values = [
            sum(float(op.loss.batch_loss(op.theta, i)) for i in op.batch_indices) for _ in range(2)
        ]
    values = _summed(op, values)
    if not np.isfinite(values[0]):
        raise FloatingPointError(
            f"non-finite diffusion loss ({values[0]}) at theta for group {op.loss.group.spec!r}"
        )
    loss_diff = abs(values[0] - values[1])
    loss_rel = loss_diff / (abs(values[0]) or 1.0)
    loss_rtol = rtol_for(op.dtype)
    if loss_rel > loss_rtol:
        raise NonDeterministicError(
            _message(op, "diffusion loss", loss_diff, loss_rel, loss_rtol, "8 eps")
        )
    gen = torch.Generator().manual_seed(seed)
    v, w = (
        torch.randn(op.shape[0], generator=gen, dtype=torch.float64).to(op.device, op.dtype)
        for _ in range(2)
    )
    first = op @ v
    second = op.fresh_product(v) if op.method == "graph-reuse" else op @ v
    scale = float(first.abs().max()) or 1.0
    if op.method == "finite-difference":
        h = op.fd_step * max(1.0, float(op.theta.norm())) / float(v.norm())
        floor = eps * float(op.gradient().abs().max()) / (h * scale)
        kind = "finite-difference round-off"
    else:
        floor, kind = _linearity_defect(op, v, w), "linearity defect"
    (floor,) = _summed(op, [floor])
    rtol = rtol_for(op.dtype, floor)
    diff = float((first - second).abs().max())
    if diff / scale > rtol:
        why = f"max(8 eps, 4 x measured {kind} {floor:.2e})"
        raise NonDeterministicError(
            _message(op, "Hessian-vector product", diff, diff / scale, rtol, why)
        )
    return DeterminismReport(str(op.dtype), loss_rel, loss_rtol, diff / scale, rtol, floor, kind)
