r"""Resurgence-guarded fine-tuning in the linear model, exactly (issue 13, item 3).

Guarded GD projects every update off a guard subspace span(U) of parameter space:
theta_{k+1} = theta_k - eta P grad L_ft(theta_k), P = I - U U^T (U orthonormal). On the quadratic
L_ft the displacement stays in range(P), where P H P acts as H does, so with the eigenpairs
(mu_i, w_i) of P H P

    theta_T - theta_u = - sum_i a(mu_i, T) <P g, w_i> w_i

(:func:`theory.law.gd_amplification`). Every readout whose gradient at theta_u lies in span(U)
has zero first-order change for every T; a linear one (rho, output_rho) exactly zero.

Guards (orthonormal columns, zero columns allowed, in the row-major flattening of theta):

- :func:`forget_output_guard`: the directions that change the denoiser's output on the erased
  prompt's data (per level t, each row of theta_t against range(S_f,t)). Guarded GD then leaves
  that output, hence the erased prompt's DDIM samples and presence, exactly where unlearning left
  them; the price is the benign loss it can no longer reduce.
- :func:`readout_guard`: the span of a few readout gradients (:func:`theory.readouts.readouts`):
  zero first-order change of those readouts only, at almost no cost.
- :func:`retain_core_guard`: a PGU-style baseline (projected-gradient unlearning, arXiv
  2604.21041, implemented from the paper's description, its code is not public): the "core
  gradient space" of the retained concepts, per level the top eigenvectors of their input second
  moments holding ``energy`` of the trace (a linear layer's gradients lie in span of its inputs).
  PGU projects the UNLEARNING update off it; here the same projector is applied to fine-tuning,
  for comparison: it protects the retained concepts' outputs, not the erased one.

Dense linear algebra in the flattened space (N = L d (d + m)): for the small problems of the
figures and tests (N up to ~1,500).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.law import gd_amplification
from theory.problem import LinearDiffusionProblem
from theory.quadratic import diffusion_grad, diffusion_loss
from theory.unlearning.targets import prompt_moments

__all__ = [
    "GuardedGD",
    "dense_hessian",
    "forget_output_guard",
    "readout_guard",
    "retain_core_guard",
    "guarded_gd",
    "guarded_gd_rows",
    "forget_output_bases",
    "retain_core_bases",
]


class GuardedGD(NamedTuple):
    """Guarded full-batch GD in closed form.

    Attributes:
      params: theta_T, ``(S, L, d, d+m)``.
      removed_fraction: ||(I - P) g|| / ||g|| at theta_u, the share of the first update that the
        guard removes (in [0, 1]).
      finetune_loss: L_ft(theta_T), ``(S,)``.
    """

    params: jax.Array
    removed_fraction: jax.Array
    finetune_loss: jax.Array


def dense_hessian(moments: jax.Array, weights: jax.Array, dim: int) -> jax.Array:
    """The loss's Hessian I_d kron 2 w_t S_t per level as a dense ``(N, N)`` matrix."""
    blocks = [jnp.kron(jnp.eye(dim, dtype=moments.dtype), 2.0 * w * s) for w, s in zip(weights, moments, strict=True)]
    return jax.scipy.linalg.block_diag(*blocks)


def _row_guard(bases: jax.Array, dim: int) -> jax.Array:
    """Columns e_t x e_i x q for every level t, row i and column q of ``bases[t]`` ``(L, n, n)``."""
    blocks = [jnp.kron(jnp.eye(dim, dtype=bases.dtype), q) for q in bases]  # (d n, d n) each
    return jax.scipy.linalg.block_diag(*blocks)


def _range_basis(matrix: jax.Array, keep_energy: float | None = None) -> jax.Array:
    """Eigenvectors of a PSD matrix spanning its range (or holding ``keep_energy`` of its trace),
    other columns zeroed: a fixed shape, so the function traces."""
    lam, vecs = jnp.linalg.eigh(matrix)
    lam, vecs = lam[::-1], vecs[:, ::-1]
    if keep_energy is None:
        keep = lam > 1e-10 * lam[0]
    else:
        before = jnp.cumsum(lam) - lam  # energy of the larger eigenvalues
        keep = (before < keep_energy * jnp.sum(lam)) & (lam > 1e-10 * lam[0])
    return vecs * keep


def forget_output_bases(problem: LinearDiffusionProblem, forget: int) -> jax.Array:
    """Per level, a basis of range(S_f,t) ``(L, n, n)`` (orthonormal or zero columns): the row
    form of :func:`forget_output_guard` (for :func:`guarded_gd_rows`)."""
    s_f, _ = prompt_moments(problem, problem.embeddings[:, forget], problem.concept_means[:, forget])
    return jax.vmap(_range_basis)(s_f)


def forget_output_guard(problem: LinearDiffusionProblem, forget: int) -> jax.Array:
    """Every direction that moves the erased prompt's denoiser output on its data, ``(N, N)``
    columns (orthonormal or zero)."""
    return _row_guard(forget_output_bases(problem, forget), problem.dim)


def readout_guard(gradients) -> jax.Array:
    """Orthonormal basis ``(N, r)`` of the span of readout gradients (each ``(L, d, d+m)``)."""
    stacked = jnp.stack([jnp.ravel(g) for g in gradients], axis=1)
    u, s, _ = jnp.linalg.svd(stacked, full_matrices=False)
    return u * (s > 1e-10 * s[0])


def retain_core_bases(problem: LinearDiffusionProblem, retain, *, energy: float = 0.97) -> jax.Array:
    """Per level, the PGU-style core basis ``(L, n, n)``: the row form of
    :func:`retain_core_guard` (for :func:`guarded_gd_rows`)."""
    total = None
    for p in retain:
        s_p, _ = prompt_moments(problem, problem.embeddings[:, p], problem.concept_means[:, p])
        total = s_p if total is None else total + s_p
    return jax.vmap(lambda s: _range_basis(s, energy))(total)


def retain_core_guard(problem: LinearDiffusionProblem, retain, *, energy: float = 0.97) -> jax.Array:
    """PGU-style core gradient space of the retained concepts (module docstring), ``(N, N)``
    columns; ``energy`` is the share of the input second moment's trace it keeps (GPM's
    threshold style; 0.97 is our choice)."""
    return _row_guard(retain_core_bases(problem, retain, energy=energy), problem.dim)


def guarded_gd(problem: LinearDiffusionProblem, moments, theta_u, guard, lr, steps) -> GuardedGD:
    """theta_T of GD whose every update is projected off span(``guard``), exactly.

    Args:
      problem: the generator (noise schedule, sizes).
      moments: S_t of the fine-tuning distribution ``(L, d+m, d+m)``.
      theta_u: start ``(L, d, d+m)``.
      guard: ``(N, r)`` orthonormal (or zero) columns; ``(N, 0)`` is plain GD.
      lr: step size eta (GD on the guarded problem is stable for eta < 2 / max mu_i).
      steps: ``(S,)`` step counts.

    Returns:
      :class:`GuardedGD`.
    """
    sched = problem.schedule
    hessian = dense_hessian(moments, sched.weights, problem.dim)
    projector = jnp.eye(hessian.shape[0], dtype=hessian.dtype) - guard @ guard.T
    mu, w = jnp.linalg.eigh(projector @ hessian @ projector)
    g = jnp.ravel(diffusion_grad(theta_u, moments, sched))
    coords = w.T @ (projector @ g)
    amp = gd_amplification(mu, lr, jnp.asarray(steps))  # (S, N)
    moved = -(amp * coords) @ w.T
    params = theta_u[None] + moved.reshape((-1,) + theta_u.shape)
    removed = jnp.linalg.norm(g - projector @ g) / jnp.linalg.norm(g)
    losses = jax.vmap(lambda t: diffusion_loss(t, moments, sched))(params)
    return GuardedGD(params, removed, losses)


def guarded_gd_rows(problem: LinearDiffusionProblem, moments, theta_u, bases, lr, steps) -> GuardedGD:
    """:func:`guarded_gd` for a row guard (each row of theta_t projected off span(``bases[t]``)),
    the form of :func:`forget_output_guard` and :func:`retain_core_guard`, without dense algebra.

    Such a guard commutes with the block structure of the Hessian (I_d kron 2 w_t S_t per level),
    so P H P is I_d kron P_t (2 w_t S_t) P_t: one ``(n, n)`` eigendecomposition per level instead
    of one ``(N, N)`` (N = L d n). The dense form stays the reference (tested equal).

    Args:
      bases: ``(L, n, n)`` per-level columns, orthonormal or zero (zeros: plain GD).
      (others as :func:`guarded_gd`)
    """
    sched = problem.schedule
    eye = jnp.eye(bases.shape[-1], dtype=moments.dtype)
    proj = eye - bases @ jnp.swapaxes(bases, -1, -2)  # (L, n, n), symmetric
    mu, w = jnp.linalg.eigh(proj @ (2.0 * sched.weights[:, None, None] * moments) @ proj)
    g = diffusion_grad(theta_u, moments, sched)  # (L, d, n)
    g_kept = g @ proj
    coords = g_kept @ w  # (L, d, n)
    amp = gd_amplification(mu, lr, jnp.asarray(steps))  # (S, L, n)
    params = theta_u[None] - (amp[:, :, None, :] * coords[None]) @ jnp.swapaxes(w, -1, -2)[None]
    removed = jnp.linalg.norm(g - g_kept) / jnp.linalg.norm(g)
    losses = jax.vmap(lambda t: diffusion_loss(t, moments, sched))(params)
    return GuardedGD(params, removed, losses)
