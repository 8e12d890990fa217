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
      basis_a: shape ``(n, p)``; basis_b: shape ``(n, q)``; columns need not be orthonormal.

    Returns:
      Shape ``(min(p, q),)``, in [0, pi/2].
    """
    qa, _ = jnp.linalg.qr(basis_a)
    qb, _ = jnp.linalg.qr(basis_b)
    cosines = jnp.linalg.svd(qa.T @ qb, compute_uv=False)
    # arccos loses accuracy near 0; use arcsin of the orthogonal residual there (as scipy does).
    cos = jnp.clip(cosines, -1.0, 1.0)
    residual = qb - qa @ (qa.T @ qb)
    sines = jnp.linalg.svd(residual, compute_uv=False)[::-1][: cos.shape[0]]
    small = cos > jnp.sqrt(0.5)
    return jnp.sort(jnp.where(small, jnp.arcsin(jnp.clip(sines, 0.0, 1.0)), jnp.arccos(cos)))
