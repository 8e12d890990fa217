"""Spectra of a :class:`~bridge.curvature.HessianOperator`: Lanczos at both ends, SLQ, Hutch++.

UNet Hessians are indefinite (a random tiny UNet has half its cross-attention K/V spectrum
negative), so eigenpairs come from Lanczos at both ends, never from power iteration, which ranks
by magnitude. The default (``method="lanczos"``, :mod:`bridge._lanczos`) is ONE Lanczos run with
full reorthogonalisation and thick restart whose Ritz values serve both ends, stopped when the
residual norms of the requested pairs meet the tolerance; ``method="eigsh"`` keeps
``scipy.sparse.linalg.eigsh`` (one ARPACK run per end). curvlinops supplies Hutch++ and
stochastic Lanczos quadrature on the same operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse.linalg as sla
import torch

from bridge._lanczos import Eigenpairs, lanczos_extremes

if TYPE_CHECKING:  # curvature.py re-exports this module's names, so no runtime import back
    from bridge.curvature import HessianOperator

__all__ = [
    "SPECTRUM_METHODS",
    "Eigenpairs",
    "curvature_along",
    "dense_hessian",
    "hutchpp_trace",
    "spectral_density",
    "spectrum_ends",
    "top_eigenpairs",
]

SpectrumMethod = Literal["lanczos", "eigsh"]
#: Eigensolvers: one thick-restart Lanczos run for both ends (default), or scipy's eigsh per end.
SPECTRUM_METHODS: tuple[str, ...] = SpectrumMethod.__args__


def _check_k(op: HessianOperator, k: int) -> int:
    n = op.shape[0]
    if not 1 <= k < n:
        raise ValueError(
            f"`k`={k} eigenpairs requested but the parameter group has n={n} parameters; "
            f"Lanczos needs 1 <= k < n (use dense_hessian for the full spectrum of a small group)"
        )
    return n


def _check_method(method: str) -> None:
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"`method` must be one of {SPECTRUM_METHODS}, got {method!r}")


def _eigsh(op: HessianOperator, k: int, which: str, tol: float, seed: int) -> Eigenpairs:
    n = op.shape[0]
    before = op.num_matvecs
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = sla.eigsh(op.to_scipy(np.float64), k=k, which=which, tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return Eigenpairs(vals[order], vecs[:, order], which, op.num_matvecs - before)


def top_eigenpairs(
    op: HessianOperator,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-8,
    seed: int = 0,
    method: SpectrumMethod = "lanczos",
    max_matvecs: int | None = None,
    max_basis: int | None = None,
) -> Eigenpairs:
    """Top-k eigenpairs at one end of the spectrum by Lanczos.

    Args:
      op: the Hessian operator (n x n).
      k: number of eigenpairs, ``1 <= k < n``.
      which: ``"LA"`` largest algebraic or ``"SA"`` smallest algebraic (most negative).
      tol: ``lanczos``: residual norms ``||H y - theta y|| <= tol * max|theta|`` (relative to
        the spectral norm; 0 = the round-off floor); ``eigsh``: ARPACK's relative accuracy of
        each Ritz value (0: machine precision).
      seed: seed of the start vector (fixed so runs are reproducible).
      method: one of :data:`SPECTRUM_METHODS`.
      max_matvecs, max_basis: ``lanczos`` budget and basis size (see
        :func:`bridge._lanczos.lanczos_extremes`).

    Returns:
      :class:`Eigenpairs` sorted by descending eigenvalue.

    Raises:
      ValueError: for ``k`` out of range, an unknown ``which`` or ``method``.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"`which` must be 'LA' or 'SA', got {which!r}")
    _check_method(method)
    _check_k(op, k)
    if method == "eigsh":
        return _eigsh(op, k, which, tol, seed)
    top, bottom = (k, 0) if which == "LA" else (0, k)
    result = lanczos_extremes(
        op, top, bottom, tol=tol, seed=seed, max_matvecs=max_matvecs, max_basis=max_basis
    )
    return Eigenpairs(
        result.eigenvalues,
        result.eigenvectors,
        which,
        result.num_matvecs,
        result.residual_norms,
        result.converged,
    )


def spectrum_ends(
    op: HessianOperator,
    k: int,
    *,
    tol: float = 1e-8,
    seed: int = 0,
    method: SpectrumMethod = "lanczos",
    max_matvecs: int | None = None,
    max_basis: int | None = None,
) -> Eigenpairs:
    """Both ends: the k largest-algebraic and k most-negative eigenpairs, merged.

    ``lanczos`` runs once and reads both ends off the same Ritz values; ``eigsh`` runs ARPACK
    once per end. Top-5 of each end to tol 1e-3 on the tiny 128-parameter cross-attention K
    group: 23 products against eigsh's 67 (benchmarks/bench_bridge_curvature.py; 16 against 42
    on the test suite's case).

    Args:
      op: Hessian operator. k: eigenpairs per end.
      tol, seed, method, max_matvecs, max_basis: as in :func:`top_eigenpairs`.

    Returns:
      :class:`Eigenpairs` with 2k columns, descending, ``which="both"``.

    Raises:
      ValueError: if ``2 k`` is not smaller than n, or for an unknown ``method``.
    """
    _check_method(method)
    n = _check_k(op, k)
    if 2 * k >= n:
        raise ValueError(f"`k`={k} per end needs 2k < n={n}; both ends would overlap")
    if method == "lanczos":
        return lanczos_extremes(
            op, k, k, tol=tol, seed=seed, max_matvecs=max_matvecs, max_basis=max_basis
        )
    top = _eigsh(op, k, "LA", tol, seed)
    bottom = _eigsh(op, k, "SA", tol, seed)
    vals = np.concatenate([top.eigenvalues, bottom.eigenvalues])
    vecs = np.concatenate([top.eigenvectors, bottom.eigenvectors], axis=1)
    return Eigenpairs(vals, vecs, "both", top.num_matvecs + bottom.num_matvecs)


def dense_hessian(op: HessianOperator, *, chunk: int = 64) -> np.ndarray:
    """The full Hessian ``(n, n)`` (float64 numpy), n products in chunks of ``chunk`` columns."""
    n = op.shape[0]
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    cols = [(op @ eye[:, i : i + chunk]).detach().cpu().double() for i in range(0, n, chunk)]
    return torch.cat(cols, dim=1).numpy()


def curvature_along(op: HessianOperator, direction: torch.Tensor) -> float:
    r"""Curvature of the loss along a direction: :math:`d^\top H d / \|d\|^2` (one HVP).

    Args:
      op: Hessian operator. direction: flat ``(n,)``, e.g. delta (``curvature_along_delta``).

    Returns:
      The Rayleigh quotient (same units as the eigenvalues).

    Raises:
      ValueError: if the direction is zero.
    """
    d = direction.to(op.device, op.dtype)
    norm_sq = float(d @ d)
    if norm_sq == 0.0:
        raise ValueError("`direction` is the zero vector: its curvature is undefined")
    return float(d @ (op @ d)) / norm_sq


def hutchpp_trace(op: HessianOperator, num_matvecs: int = 99, *, seed: int = 0) -> float:
    """Hutch++ estimate of tr(H) with ``num_matvecs`` products (curvlinops' implementation).

    On indefinite UNet Hessians the variance is large (architecture.md: 70-180 % off at 48
    probes); never report it alone, pair it with the eigenvalues.

    Args:
      op: Hessian operator. num_matvecs: multiple of 3. seed: seed of the probe vectors.

    Returns:
      The trace estimate (float).
    """
    from curvlinops import hutchpp_trace as _hutchpp

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(_hutchpp(op, num_matvecs))


def spectral_density(
    op: HessianOperator,
    *,
    lanczos_steps: int = 30,
    num_probes: int = 1,
    num_points: int = 256,
    boundaries: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density by stochastic Lanczos quadrature (curvlinops, Papyan 2020, alg. 2).

    Args:
      op: Hessian operator. lanczos_steps: Lanczos vectors per probe (quadrature nodes).
      num_probes: random start vectors averaged. num_points: grid resolution.
      boundaries: (lambda_min, lambda_max); default estimated by eigsh (extra products).
      seed: seed of the start vectors.

    Returns:
      ``(grid, density)``, each ``(num_points,)``; the density integrates to ~1 over the grid.
    """
    from curvlinops import lanczos_approximate_spectrum

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grid, density = lanczos_approximate_spectrum(
            op, lanczos_steps, num_points=num_points, num_repeats=num_probes, boundaries=boundaries
        )
    return np.asarray(grid, dtype=np.float64), np.asarray(density, dtype=np.float64)
