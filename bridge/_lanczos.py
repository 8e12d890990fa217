r"""One Lanczos run for both ends of an indefinite spectrum (full reorthogonalisation, thick restart).

The Krylov basis V is kept orthonormal to working precision (classical Gram-Schmidt repeated while
it cancels, the DGKS criterion), so the projected matrix :math:`T = V^\top H V` is computed
entry by entry from those projections and both ends of its spectrum are valid at once: no ghost
eigenvalues, one run instead of one per end. With :math:`H V_m = V_m T_m + r e_m^\top`, a Ritz
pair :math:`(\theta_i, y_i = V_m s_i)` has the residual norm

.. math:: \|H y_i - \theta_i y_i\| = \|r\|\,|e_m^\top s_i|

at no extra product; the run stops once every requested pair has
:math:`\|H y_i - \theta_i y_i\| \le \mathrm{tol} \cdot \max_j |\theta_j|`. That bounds each
eigenvalue error by the residual (and by residual^2 / gap once the pair is isolated), and the
angle between the requested Ritz subspace and the true eigenspace by residual / gap (Davis-Kahan).
When the basis reaches ``max_basis`` vectors it is restarted thickly (Wu & Simon 2000): the
requested Ritz vectors and some of their neighbours at each end are kept with the residual
direction, and T becomes an arrow matrix; the same projections fill it in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bridge.curvature import HessianOperator

__all__ = ["Eigenpairs", "lanczos_extremes"]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs of a Hessian, eigenvalues in descending order within each end.

    Attributes:
      eigenvalues: shape ``(k,)`` (units of the loss per parameter^2).
      eigenvectors: orthonormal columns, shape ``(n, k)``.
      which: ``"LA"`` (largest algebraic), ``"SA"`` (most negative) or ``"both"`` (the LA end,
        descending, then the SA end, descending).
      num_matvecs: Hessian-vector products spent.
      residual_norms: ``||H y_i - theta_i y_i||`` per pair, ``(k,)`` (Lanczos; None for eigsh).
      converged: whether every residual met the tolerance within the budget.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    which: str
    num_matvecs: int
    residual_norms: np.ndarray | None = None
    converged: bool = True


def _orthogonalise(basis: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``w`` off the rows of ``basis``, repeating while it cancels (DGKS, <= 3 passes)."""
    coeffs = torch.zeros(basis.shape[0], dtype=w.dtype, device=w.device)
    for _ in range(3):
        before = w.norm()
        c = basis @ w
        w = w - c @ basis
        coeffs = coeffs + c
        if w.norm() > 0.7 * before:  # little cancellation: orthogonal to working precision
            break
    return w, coeffs


def _wanted(m: int, top: int, bottom: int) -> np.ndarray:
    """Indices of the requested Ritz values (ascending order): the top end then the bottom."""
    return np.r_[np.arange(m - 1, m - 1 - top, -1), np.arange(bottom - 1, -1, -1)].astype(int)


def lanczos_extremes(
    op: HessianOperator,
    top: int,
    bottom: int,
    *,
    tol: float = 1e-8,
    seed: int = 0,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
) -> Eigenpairs:
    """The ``top`` largest-algebraic and ``bottom`` most-negative eigenpairs from one Lanczos run.

    Args:
      op: symmetric operator ``(n, n)`` with ``@`` on flat tensors (``dtype``, ``device``).
      top, bottom: eigenpairs wanted at each end, ``1 <= top + bottom < n``.
      tol: stop when every wanted residual ``||H y - theta y|| <= tol * max|theta|``; raised to
        the round-off floor 4 eps of the operator's dtype (0 means that floor).
      seed: seed of the (numpy) Gaussian start vector, as for eigsh.
      max_matvecs: product budget (default ``max(300, 10 * max_basis)``, at most ``10 n``).
      max_basis: Krylov vectors kept before a thick restart (default ``min(n, 2 (top + bottom)
        + 20)``); memory ``max_basis * n`` floats (float64 for a float64 operator, else float32).

    Returns:
      :class:`Eigenpairs`: the top end descending, then the bottom end descending, with the
      residual norms; ``converged=False`` (and a warning) if the budget ran out first.

    Raises:
      ValueError: if ``top + bottom`` is not in ``[1, n)`` or ``max_basis`` is too small.
    """
    n = op.shape[0]
    wanted = top + bottom
    if not 1 <= wanted < n:
        raise ValueError(f"`top` + `bottom` = {wanted} eigenpairs must be in [1, n={n})")
    max_basis = min(n, 2 * wanted + 20) if max_basis is None else min(int(max_basis), n)
    if max_basis < min(n, wanted + 2):
        raise ValueError(f"`max_basis`={max_basis} must be at least {wanted + 2} (wanted + 2)")
    max_matvecs = min(10 * n, max(300, 10 * max_basis)) if max_matvecs is None else max_matvecs
    tol = max(float(tol), 4 * float(torch.finfo(op.dtype).eps))
    dtype = torch.float64 if op.dtype == torch.float64 else torch.float32
    basis = torch.zeros(max_basis + 1, n, dtype=dtype, device=op.device)
    proj = np.zeros((max_basis + 1, max_basis + 1))  # T = V^T H V, filled column by column
    start = torch.as_tensor(np.random.default_rng(seed).standard_normal(n))
    basis[0] = (start / start.norm()).to(op.device, dtype)
    rng = np.random.default_rng(seed + 1)  # only for a new direction after an invariant subspace
    m, count, before = 0, 0, op.num_matvecs
    while True:
        w = (op @ basis[m].to(op.dtype)).to(dtype)
        count += 1
        w, h = _orthogonalise(basis[: m + 1], w)
        h = h.double().cpu().numpy()
        proj[: m + 1, m] = h
        proj[m, : m + 1] = h
        beta = float(w.norm())
        m += 1
        theta, s = np.linalg.eigh(proj[:m, :m])
        residuals = beta * np.abs(s[m - 1])
        scale = max(float(np.abs(theta).max()), np.finfo(np.float64).tiny)
        if m >= wanted:
            idx = _wanted(m, top, bottom)
            converged = bool(np.all(residuals[idx] <= tol * scale))
            if converged or count >= max_matvecs or m == n:
                break
        if m == max_basis:  # thick restart: keep the wanted pairs and neighbours at each end
            extra = (max_basis - 1 - wanted) // 2
            keep_top = top + (extra // 2 if bottom else extra) if top else 0
            keep_bottom = bottom + (extra - extra // 2 if top else extra) if bottom else 0
            keep = np.r_[np.arange(keep_bottom), np.arange(m - keep_top, m)].astype(int)
            kept = torch.as_tensor(s[:, keep].T, dtype=dtype, device=op.device) @ basis[:m]
            basis[: len(keep)] = kept
            proj[:] = 0.0
            proj[np.arange(len(keep)), np.arange(len(keep))] = theta[keep]
            m = len(keep)
        if beta <= np.finfo(np.float64).tiny or float(w.norm()) == 0.0:
            # Invariant subspace (exactly zero residual): continue from a fresh direction.
            fresh = torch.as_tensor(rng.standard_normal(n), dtype=dtype).to(op.device)
            w, _ = _orthogonalise(basis[:m], fresh)
            beta = float(w.norm())
        basis[m] = w / beta
    idx = _wanted(m, top, bottom)
    vectors = (torch.as_tensor(s[:, idx].T, dtype=dtype, device=op.device) @ basis[:m]).T
    if not converged:
        warnings.warn(
            f"Lanczos stopped after {count} Hessian-vector products (max_matvecs={max_matvecs}) "
            f"with residual norms up to {residuals[idx].max() / scale:.2e} x max|theta| > tol "
            f"{tol:.1e}; raise `max_matvecs` or `tol` (the operator's round-off floor is about "
            f"4 eps = {4 * float(torch.finfo(op.dtype).eps):.1e})",
            RuntimeWarning,
            stacklevel=3,
        )
    which = "both" if top and bottom else ("LA" if top else "SA")
    return Eigenpairs(
        theta[idx],
        vectors.double().cpu().numpy(),
        which,
        op.num_matvecs - before,
        residuals[idx],
        converged,
    )
