r"""The fine-tuning loss's local quadratic model at theta_u, as measured (pipeline step 2).

Everything :mod:`bridge.predict` needs, and nothing it would have to recompute: the gradient g,
and any of

* both ends of the Hessian spectrum (:func:`bridge.spectra.spectrum_ends`, the one Lanczos
  tolerance policy of :mod:`bridge.spectra`) with the closure's curvature lambda_perp of
  g_perp = g - V V^T g (one more HVP): the eigenpairs + closure predictor of theory.md s.4;
* one Lanczos run started at g (:func:`theory.krylov.lanczos` with the bridge HVP as matvec):
  theta_T - theta_u = -||g|| V_m a(T_m, T) e_1 exactly for T <= m, so every readout and the
  displacement itself come from it (theory.md s.4b);
* per readout, the two polarisation runs at s u +/- g (s = ||g|| / ||u||) whose Gauss quadrature
  gives <u, a(H, T) g> exactly for T <= 2m (theory.md s.4b).

The HVP count of each part is recorded, so predictors can be compared at equal accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bridge.spectra import spectrum_ends
from theory.krylov import LanczosRun, PolarisationRuns, lanczos, polarisation_runs

__all__ = [
    "LocalCurvature",
    "PolarisationRuns",
    "check_krylov_depth",
    "measure_local_curvature",
    "numpy_matvec",
]


@dataclass(frozen=True)
class LocalCurvature:
    """The measured local quadratic model of the fine-tuning loss at theta_u.

    Attributes:
      gradient: g = grad L_ft(theta_u), ``(n,)`` float64.
      eigenvalues: ``(2k,)`` the k largest-algebraic then the k most-negative eigenvalues, or
        None. eigenvectors: ``(n, 2k)`` orthonormal, or None. eigen_converged: Lanczos met its
        tolerance.
      lambda_perp: Rayleigh quotient of H along g_perp (the closure), or None.
      krylov: Lanczos run started at g (depth ``krylov.matvecs``), or None.
      quadrature: readout name -> :class:`PolarisationRuns`.
      hvps: Hessian-vector products per part (``eigenpairs``, ``closure``, ``krylov``,
        ``quadrature[<name>]``).
      group_spec: the parameter group. numel: its size n.
    """

    gradient: np.ndarray
    group_spec: str
    numel: int
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    eigen_converged: bool = True
    lambda_perp: float | None = None
    krylov: LanczosRun | None = None
    quadrature: dict[str, PolarisationRuns] = field(default_factory=dict)
    hvps: dict[str, int] = field(default_factory=dict)

    @property
    def lambda_max(self) -> float:
        """Largest eigenvalue measured (eigenpairs, else the largest Ritz value of the run)."""
        if self.eigenvalues is not None:
            return float(np.max(self.eigenvalues))
        if self.krylov is not None:
            return float(np.max(self.krylov.ritz()[0]))
        raise ValueError("no curvature was measured: pass `top_k` or `krylov_depth`.")


def numpy_matvec(op):
    """``v (n,) numpy -> H v (n,) float64 numpy`` through a :class:`HessianOperator`."""

    def matvec(v):
        x = torch.as_tensor(np.asarray(v), dtype=op.dtype, device=op.device)
        return (op @ x).detach().cpu().double().numpy()

    return matvec


def check_krylov_depth(depth: int, steps: Sequence[int], *, factor: int, argument: str) -> None:
    """Refuse a Lanczos depth too small for an exact prediction at every T (one line).

    Args:
      depth: Lanczos steps m. steps: the T of the prediction. factor: 1 (displacement, exact
        for T <= m) or 2 (Gauss quadrature, T <= 2m). argument: name for the message.

    Raises:
      ValueError: ``factor * depth < max(steps)``.
    """
    t_max = int(max(steps)) if len(steps) else 0
    if factor * int(depth) < t_max:
        need = math.ceil(t_max / factor)
        what = "the displacement, T <= m" if factor == 1 else "Gauss quadrature, T <= 2m"
        raise ValueError(
            f"`{argument}` = {depth} Lanczos steps is exact only up to T = {factor * depth} "
            f"({what}) but the largest T is {t_max}: use {argument} >= {need}, or exact=False."
        )


def measure_local_curvature(
    op,
    *,
    top_k: int | None = None,
    krylov_depth: int | None = None,
    quadrature: dict[str, np.ndarray] | None = None,
    quadrature_depth: int | None = None,
    seed: int = 0,
) -> LocalCurvature:
    """Measure g and the requested curvature parts at the operator's theta (= theta_u).

    Args:
      op: :class:`bridge.curvature.HessianOperator` of the fine-tuning loss at theta_u.
      top_k: eigenpairs per end of the spectrum (None: no eigenpairs, no closure).
      krylov_depth: Lanczos steps of the run at g (None: no run). Exact for every T <= depth.
      quadrature: readout name -> grad R(theta_u) ``(n,)``, for polarisation runs.
      quadrature_depth: Lanczos steps per polarisation run (exact for T <= 2 depth).
      seed: seed of the eigenpairs' Lanczos start vector.

    Returns:
      :class:`LocalCurvature`.

    Raises:
      ValueError: nothing requested, ``quadrature`` without a depth, a zero readout gradient.
    """
    if top_k is None and krylov_depth is None and not quadrature:
        raise ValueError("nothing to measure: give `top_k`, `krylov_depth` or `quadrature`.")
    if quadrature and quadrature_depth is None:
        raise ValueError("`quadrature` runs need `quadrature_depth` (Lanczos steps per run).")
    matvec = numpy_matvec(op)
    grad = op.gradient().detach().cpu().double().numpy()
    hvps: dict[str, int] = {}
    parts: dict = {}

    def counted(name, fn):
        before = op.num_matvecs
        out = fn()
        hvps[name] = op.num_matvecs - before
        return out

    if top_k is not None:
        ends = counted("eigenpairs", lambda: spectrum_ends(op, top_k, seed=seed))
        vecs = np.asarray(ends.eigenvectors, dtype=np.float64)
        g_perp = grad - vecs @ (vecs.T @ grad)
        norm_sq = float(g_perp @ g_perp)
        lam_perp = counted(
            "closure", lambda: float(g_perp @ matvec(g_perp)) / norm_sq if norm_sq > 0 else 0.0
        )
        parts.update(
            eigenvalues=np.asarray(ends.eigenvalues, dtype=np.float64),
            eigenvectors=vecs,
            eigen_converged=bool(ends.converged),
            lambda_perp=lam_perp,
        )
    if krylov_depth is not None:
        if not np.any(grad):
            raise ValueError("the fine-tuning gradient is zero at theta_u: GD does not move.")
        parts["krylov"] = counted("krylov", lambda: lanczos(matvec, grad, int(krylov_depth)))
    runs = {}
    for name, u in (quadrature or {}).items():
        u = np.asarray(u, dtype=np.float64)
        if not np.any(u):
            raise ValueError(f"readout `{name}` has zero gradient: no quadrature to run.")
        runs[name] = counted(
            f"quadrature[{name}]",
            lambda u=u: polarisation_runs(matvec, grad, u, int(quadrature_depth)),
        )
    return LocalCurvature(
        gradient=grad,
        group_spec=op.loss.group.spec,
        numel=int(grad.shape[0]),
        quadrature=runs,
        hvps=hvps,
        **parts,
    )
