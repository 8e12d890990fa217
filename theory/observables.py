"""Observables with the names of theory.md section 4, shared in meaning with bridge/."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.quadratic import HessianEigen, eigen_coordinates

__all__ = [
    "rho",
    "forget_loss_recovery",
    "curvature_along_delta",
    "spectral_weights",
    "principal_angles",
    "angles_between_orthonormal",
]


def rho(theta_t: jax.Array, theta_u: jax.Array, theta_0: jax.Array) -> jax.Array:
    r"""Parameter-space resurgence rho = -<theta_T - theta_u, delta> / ||delta||^2.

    delta = theta_u - theta_0. 0 means still unlearned, 1 means the unlearning displacement is
    fully undone. ``theta_t`` may carry leading batch axes (e.g. step counts).
    """
    delta = theta_u - theta_0
    moved = theta_t - theta_u
    axes = tuple(range(moved.ndim - delta.ndim, moved.ndim))
    return -jnp.sum(moved * delta, axis=axes) / jnp.sum(delta**2)


def forget_loss_recovery(loss_theta_t, loss_theta_u, loss_theta_0):
    r"""(L_f(theta_u) - L_f(theta_T)) / (L_f(theta_u) - L_f(theta_0)): 1 = forget loss fully back."""
    return (loss_theta_u - loss_theta_t) / (loss_theta_u - loss_theta_0)


def curvature_along_delta(delta: jax.Array, eigen: HessianEigen) -> jax.Array:
    r"""delta^T H delta / ||delta||^2 from the block eigendecomposition (units of the loss)."""
    coords = eigen_coordinates(delta, eigen)
    return jnp.sum(eigen.eigenvalues[:, None, :] * coords**2) / jnp.sum(delta**2)


def spectral_weights(delta: jax.Array, eigen: HessianEigen) -> jax.Array:
    r"""<v_i, delta/||delta||>^2 summed over each eigenspace (L, d+m): they sum to one.

    Each block eigenvalue lambda_{t,j} has a d-dimensional eigenspace (one copy per row of theta);
    the weight reported is the squared norm of delta's projection on that whole eigenspace.
    """
    coords = eigen_coordinates(delta, eigen)
    return jnp.sum(coords**2, axis=-2) / jnp.sum(delta**2)


def principal_angles(basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
    """Principal angles (radians, ascending) between span(basis_a) and span(basis_b).

    Args:
      basis_a: shape ``(n, p)``; basis_b: shape ``(n, q)``; columns need not be orthonormal but
        must be linearly independent (p, q <= n).

    Returns:
      Shape ``(min(p, q),)``, in [0, pi/2], exact to round-off at small angles (arcsin branch).
    """
    qa, _ = jnp.linalg.qr(basis_a)
    qb, _ = jnp.linalg.qr(basis_b)
    return angles_between_orthonormal(qa, qb, qa.shape[1], qb.shape[1])


def angles_between_orthonormal(qa: jax.Array, qb: jax.Array, rank_a, rank_b) -> jax.Array:
    """Principal angles between the spans of orthonormal columns; zero columns are ignored.

    The one implementation used by :func:`principal_angles`, the sweep and ``bridge``. arccos of
    the cosines loses half the digits near 0 (an angle of 1e-9 rad came out as 1.5e-8), so small
    angles come from arcsin of the singular values of the residual ``qb - qa qa^T qb`` (as
    ``scipy.linalg.subspace_angles`` does; written here because it must run inside ``jit``/``vmap``
    with traced ranks).

    Args:
      qa: ``(n, p)`` orthonormal columns, possibly with zero (masked) columns; rank_a of them
        nonzero. qb: ``(n, q)`` likewise with rank_b nonzero columns, q <= n.
      rank_a, rank_b: numbers of nonzero columns (ints or traced integer scalars).

    Returns:
      Shape ``(min(p, q),)``: ascending angles in radians; NaN past min(rank_a, rank_b).
    """
    coupling = qa.T @ qb
    cosines = jnp.clip(jnp.linalg.svd(coupling, compute_uv=False), 0.0, 1.0)  # descending
    count = cosines.shape[0]
    residual = qb - qa @ coupling
    sines = jnp.sort(jnp.linalg.svd(residual, compute_uv=False))  # ascending
    # qb's q - rank_b zero columns add that many zero singular values in front: skip them.
    offset = qb.shape[1] - rank_b
    sines = jnp.take(sines, offset + jnp.arange(count), mode="clip")
    near_zero = cosines > jnp.sqrt(0.5)
    angles = jnp.where(near_zero, jnp.arcsin(jnp.clip(sines, 0.0, 1.0)), jnp.arccos(cosines))
    return jnp.where(jnp.arange(count) < jnp.minimum(rank_a, rank_b), angles, jnp.nan)
