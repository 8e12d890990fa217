"""Spectra of a :class:`~bridge.curvature.HessianOperator`: Lanczos at both ends, SLQ, Hutch++.

UNet Hessians are indefinite (a random tiny UNet has half its cross-attention K/V spectrum
negative), so eigenpairs come from ``scipy.sparse.linalg.eigsh`` at both ends ('LA' and 'SA'),
never from power iteration, which ranks by magnitude. curvlinops supplies Hutch++ and
stochastic Lanczos quadrature on the same operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse.linalg as sla
import torch

if TYPE_CHECKING:  # curvature.py re-exports this module's names, so no runtime import back
    from bridge.curvature import HessianOperator

__all__ = [
    "Eigenpairs",
    "curvature_along",
    "dense_hessian",
    "hutchpp_trace",
    "spectral_density",
    "spectrum_ends",
    "top_eigenpairs",
]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs of a Hessian, eigenvalues in descending order.

    Attributes:
      eigenvalues: shape ``(k,)`` (units of the loss per parameter^2).
      eigenvectors: orthonormal columns, shape ``(n, k)``.
      which: ``"LA"`` (largest algebraic), ``"SA"`` (most negative) or ``"both"``.
      num_matvecs: Hessian-vector products spent.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    which: str
    num_matvecs: int


def _check_k(op: HessianOperator, k: int) -> int:
    n = op.shape[0]
    if not 1 <= k < n:
        raise ValueError(
            f"`k`={k} eigenpairs requested but the parameter group has n={n} parameters; "
            f"Lanczos needs 1 <= k < n (use dense_hessian for the full spectrum of a small group)"
        )
    return n


def top_eigenpairs(
    op: HessianOperator, k: int, *, which: str = "LA", tol: float = 1e-8, seed: int = 0
) -> Eigenpairs:
    """Top-k eigenpairs at one end of the spectrum by Lanczos (``scipy.sparse.linalg.eigsh``).

    Args:
      op: the Hessian operator (n x n).
      k: number of eigenpairs, ``1 <= k < n``.
      which: ``"LA"`` largest algebraic or ``"SA"`` smallest algebraic (most negative).
      tol: eigsh's relative accuracy of the Ritz values (0: machine precision).
      seed: seed of Lanczos' start vector (fixed so runs are reproducible).

    Returns:
      :class:`Eigenpairs` sorted by descending eigenvalue.

    Raises:
      ValueError: for ``k`` out of range or an unknown ``which``.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"`which` must be 'LA' or 'SA', got {which!r}")
    n = _check_k(op, k)
    before = op.num_matvecs
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = sla.eigsh(op.to_scipy(np.float64), k=k, which=which, tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return Eigenpairs(vals[order], vecs[:, order], which, op.num_matvecs - before)


def spectrum_ends(op: HessianOperator, k: int, **kwargs) -> Eigenpairs:
    """Both ends: the k largest-algebraic and k most-negative eigenpairs, merged.

    When 2k >= n the two ends overlap; the full spectrum is then returned (via ``k = n - 1``
    from each end and de-duplication is not attempted: use :func:`dense_hessian` there).

    Args:
      op: Hessian operator. k: eigenpairs per end. **kwargs: ``tol``, ``seed`` of
        :func:`top_eigenpairs`.

    Returns:
      :class:`Eigenpairs` with up to 2k columns, descending, ``which="both"``.

    Raises:
      ValueError: if ``2 k`` is not smaller than n.
    """
    n = _check_k(op, k)
    if 2 * k >= n:
        raise ValueError(f"`k`={k} per end needs 2k < n={n}; both ends would overlap")
    top = top_eigenpairs(op, k, which="LA", **kwargs)
    bottom = top_eigenpairs(op, k, which="SA", **kwargs)
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
