r"""The resurgence law in Krylov form: exact predictions from Lanczos runs (theory.md s.4b).

GD's amplification a(lambda, T) = eta sum_{s<T} (1 - eta lambda)^s is a polynomial of degree T - 1
in lambda. For a symmetric H and vectors w, u, g:

- w^T a(H, T) w = ||w||^2 e_1^T a(T_m, T) e_1 exactly when T <= 2m (Gauss quadrature with the m
  nodes of the Lanczos tridiagonal T_m started at w is exact for degree <= 2m - 1);
- <u, a(H, T) g> follows by polarisation, (q(u + g) - q(u - g)) / 4, from two runs;
- a(H, T) g = ||g|| V_m a(T_m, T) e_1 exactly when T <= m (the Krylov space holds the polynomial).

Any sign of curvature is allowed: nothing is asked of the eigenvalues, and no eigenvector has to
converge. One run serves every learning rate and every T in range. If the Krylov space becomes
invariant (breakdown), the run stops early and is exact for every T.

The iteration is plain NumPy on any matvec (JAX arrays, or a torch HVP through ``bridge``), with
full reorthogonalisation: scipy's ``eigsh`` hides its tridiagonal, and the quadrature needs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from theory.law import gd_amplification

__all__ = [
    "LanczosRun",
    "PolarisationRuns",
    "lanczos",
    "polarisation_runs",
    "polarised_quadrature",
    "quadrature_amplification",
    "krylov_readout_change",
    "krylov_displacement",
    "krylov_depth_for",
]

# Breakdown: the next Lanczos vector is round-off relative to the scale of H's action seen so far.
_BREAKDOWN = 1e-12


class LanczosRun(NamedTuple):
    """A Lanczos run started at ``start``.

    Attributes:
      alphas: diagonal of T_m, ``(m,)``; betas: off-diagonal, ``(m - 1,)``.
      basis: orthonormal Lanczos vectors as columns, ``(n, m)``.
      start_norm: ||start||.
      matvecs: Hessian-vector products used (= m, or fewer after a breakdown).
      invariant: the Krylov space became invariant (the quadrature is exact for every T).
    """

    alphas: np.ndarray
    betas: np.ndarray
    basis: np.ndarray
    start_norm: float
    matvecs: int
    invariant: bool

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes theta_j (eigenvalues of T_m) and Gauss weights (first components squared)."""
        m = self.alphas.shape[0]
        if m == 0:
            return np.zeros(0), np.zeros(0)
        tri = np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)
        nodes, vecs = np.linalg.eigh(tri)
        return nodes, vecs[0] ** 2


def lanczos(matvec: Callable, start, num_steps: int) -> LanczosRun:
    """m = ``num_steps`` Lanczos steps on a symmetric operator, full reorthogonalisation.

    Args:
      matvec: v -> H v on flat vectors ``(n,)`` (NumPy, JAX or anything ``np.asarray`` accepts).
      start: starting vector ``(n,)``; its norm is kept for the quadrature.
      num_steps: m >= 1 (at most n).

    Returns:
      :class:`LanczosRun` (stops early, ``invariant=True``, on breakdown).

    Raises:
      ValueError: ``num_steps`` < 1, a zero or non-finite start.
    """
    start = np.asarray(start, dtype=np.float64).reshape(-1)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1; got {num_steps!r}.")
    norm = float(np.linalg.norm(start))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"`start` must be a finite nonzero vector; got norm {norm}.")
    n = start.shape[0]
    m = min(int(num_steps), n)
    basis = np.zeros((n, m))
    alphas, betas = [], []
    q = start / norm
    scale = 0.0
    invariant = False
    for j in range(m):
        basis[:, j] = q
        w = np.asarray(matvec(q), dtype=np.float64).reshape(-1)
        alpha = float(q @ w)
        alphas.append(alpha)
        # Full reorthogonalisation, twice ("twice is enough"): keeps T_m's quadrature exact.
        for _ in range(2):
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta = float(np.linalg.norm(w))
        scale = max(scale, abs(alpha), beta)
        if j == m - 1:
            invariant = beta <= _BREAKDOWN * scale or m == n
            break
        if beta <= _BREAKDOWN * scale:
            invariant = True
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    return LanczosRun(
        np.array(alphas), np.array(betas[: k - 1]), basis[:, :k], norm, k, invariant
    )


def krylov_depth_for(steps) -> int:
    """Lanczos steps m that make the quadratic-form prediction exact for every T in ``steps``."""
    return max(1, math.ceil(max(int(t) for t in np.atleast_1d(steps)) / 2))


def _check_depth(run: LanczosRun, steps, factor: int, what: str) -> None:
    t_max = int(np.max(np.atleast_1d(steps)))
    if not run.invariant and factor * run.matvecs < t_max:
        need = math.ceil(t_max / factor)
        raise ValueError(
            f"`num_steps` = {run.matvecs} Lanczos steps give {what} exactly only for T <= "
            f"{factor * run.matvecs}; the largest requested T is {t_max}: use num_steps >= {need} "
            "(or exact=False to accept the truncated quadrature)."
        )


def quadrature_amplification(run: LanczosRun, lr, steps, *, exact: bool = True) -> np.ndarray:
    """w^T a(H, T) w for the run's start w, for each T: ||w||^2 sum_j weight_j a(theta_j, T).

    Args:
      run: :func:`lanczos` started at w.
      lr: GD step size; steps: ``(S,)`` step counts.
      exact: raise unless the run is deep enough (T <= 2m) for every T.

    Returns:
      ``(S,)`` values in units of lr * steps * ||w||^2.

    Raises:
      ValueError: the run is too short for exactness (and ``exact``).
    """
    if exact:
        _check_depth(run, steps, 2, "the quadratic form")
    nodes, weights = run.ritz()
    amp = np.asarray(gd_amplification(nodes, lr, np.asarray(steps)), dtype=np.float64)  # (S, m)
    return run.start_norm**2 * amp @ weights


class PolarisationRuns(NamedTuple):
    """The two Lanczos runs of one readout's polarisation, at ``scale u + g`` and ``scale u - g``.

    Attributes:
      plus, minus: the runs (``minus`` None when u is parallel to g: then q(su - g) = 0).
      scale: s = ||g|| / ||u||, so that both starts are well away from zero.
    """

    plus: LanczosRun
    minus: LanczosRun | None
    scale: float

    @property
    def matvecs(self) -> int:
        """Hessian-vector products of both runs."""
        return self.plus.matvecs + (0 if self.minus is None else self.minus.matvecs)


def polarisation_runs(matvec: Callable, grad, readout, num_steps: int) -> PolarisationRuns:
    """Run Lanczos at s u + g and s u - g (s = ||g|| / ||u||): the input of
    :func:`polarised_quadrature`.

    Args:
      matvec: v -> H v on flat vectors; grad: g ``(n,)``; readout: u = grad R(theta_u) ``(n,)``.
      num_steps: Lanczos depth m per run (the quadrature is exact for T <= 2m).

    Returns:
      :class:`PolarisationRuns` (2m HVPs, m when u is parallel to g).

    Raises:
      ValueError: a zero readout gradient or a zero fine-tuning gradient (nothing to polarise).
    """
    g = np.asarray(grad, dtype=np.float64).reshape(-1)
    u = np.asarray(readout, dtype=np.float64).reshape(-1)
    if not np.any(u):
        raise ValueError(
            "`readout` gradient is zero: the readout does not depend on the fine-tuned parameters."
        )
    if not np.any(g):
        raise ValueError("`grad` is zero: GD does not move from theta_u, nothing to predict.")
    scale = float(np.linalg.norm(g) / np.linalg.norm(u))
    plus = lanczos(matvec, scale * u + g, num_steps)
    minus_start = scale * u - g
    if np.linalg.norm(minus_start) <= 1e-14 * np.linalg.norm(g):  # u parallel to g
        return PolarisationRuns(plus, None, scale)
    return PolarisationRuns(plus, lanczos(matvec, minus_start, num_steps), scale)


def polarised_quadrature(runs: PolarisationRuns, lr, steps, *, exact: bool = True) -> np.ndarray:
    r"""<u, a(H, T) g> for each T from the runs' tridiagonals (polarisation identity).

    .. math:: \langle u, a(H,T)\,g\rangle = \frac{q(su+g) - q(su-g)}{4s},\quad
              q(w) = \|w\|^2 e_1^T a(T_m^{(w)}, T)\, e_1

    The one implementation for theory and bridge: it reads only the Lanczos coefficients, so a
    run made on a torch HVP (``bridge.local_curvature``) is combined exactly as a NumPy one.

    Args:
      runs: from :func:`polarisation_runs`. lr: GD step size; steps: ``(S,)`` step counts.
      exact: raise unless both runs are deep enough (T <= 2m) for every T.

    Returns:
      ``(S,)`` in units of lr * steps * <u, g>; Delta R(T) is minus this.

    Raises:
      ValueError: a run too short for exactness (and ``exact``).

    >>> h = np.diag([1.0, 3.0]); g = np.array([1.0, 1.0]); u = np.array([2.0, 0.0])
    >>> runs = polarisation_runs(lambda v: h @ v, g, u, 2)
    >>> # <u, a(H, 2) g> = 2 a(1, 2) = 2 (1 - 0.9**2)
    >>> float(np.round(polarised_quadrature(runs, 0.1, np.array([2]))[0], 12))
    0.38
    """
    q = quadrature_amplification(runs.plus, lr, steps, exact=exact)
    if runs.minus is not None:
        q = q - quadrature_amplification(runs.minus, lr, steps, exact=exact)
    return q / (4.0 * runs.scale)


def krylov_readout_change(
    matvec: Callable, grad, readout, lr, steps, *, num_steps: int | None = None, exact=True
):
    r"""Delta R(T) = -<grad R, a(H, T) g> for GD, exactly, from two Lanczos runs (polarisation).

    :func:`polarisation_runs` then :func:`polarised_quadrature` for each lr.

    Args:
      matvec: v -> H v on flat vectors; grad: g ``(n,)``; readout: grad R(theta_u) ``(n,)``.
      lr: a step size or a sequence of them ``(R,)`` (one pair of runs serves all).
      steps: ``(S,)`` step counts.
      num_steps: Lanczos depth per run; default the exact depth ceil(max T / 2).
      exact: raise if ``num_steps`` is too small for exactness.

    Returns:
      ``(S,)`` for a scalar lr, else ``(R, S)``; and the number of HVPs used, as a tuple.

    Raises:
      ValueError: a readout gradient that is zero, or a depth too small for exactness.
    """
    g = np.asarray(grad, dtype=np.float64).reshape(-1)
    u = np.asarray(readout, dtype=np.float64).reshape(-1)
    if not np.any(u):
        raise ValueError(
            "`readout` gradient is zero: the readout does not depend on the fine-tuned parameters."
        )
    lrs = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    if not np.any(g):  # GD does not move from a stationary point
        change = np.zeros((lrs.size, np.atleast_1d(steps).size))
        return (change[0] if np.ndim(lr) == 0 else change), 0
    depth = krylov_depth_for(steps) if num_steps is None else num_steps
    runs = polarisation_runs(matvec, g, u, depth)
    change = -np.stack([polarised_quadrature(runs, r, steps, exact=exact) for r in lrs])
    return (change[0] if np.ndim(lr) == 0 else change), runs.matvecs


def krylov_displacement(run: LanczosRun, lr, steps, *, exact: bool = True) -> np.ndarray:
    """theta_T - theta_u = -a(H, T) g = -||g|| V_m a(T_m, T) e_1 from a run started at g.

    Args:
      run: :func:`lanczos` started at the fine-tuning gradient g.
      lr: GD step size; steps: ``(S,)``.
      exact: raise unless T <= m for every T (or the Krylov space is invariant).

    Returns:
      ``(S, n)`` displacements (same units as theta).

    Raises:
      ValueError: the run is too short for exactness (and ``exact``).
    """
    if exact:
        _check_depth(run, steps, 1, "the displacement")
    tri = np.diag(run.alphas) + np.diag(run.betas, 1) + np.diag(run.betas, -1)
    nodes, vecs = np.linalg.eigh(tri)
    amp = np.asarray(gd_amplification(nodes, lr, np.asarray(steps)), dtype=np.float64)  # (S, m)
    coeffs = (amp * vecs[0][None]) @ vecs.T  # rows: a(T_m, T) e_1, shape (S, m)
    return -run.start_norm * coeffs @ run.basis.T
