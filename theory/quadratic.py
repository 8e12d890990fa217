r"""The diffusion loss as an exact quadratic (theory.md section 1).

Parameters are one array ``theta`` of shape ``(L, d, d + m)``: per noise level theta_t = [W_t, V_t]
with eps_hat(x_t, t, c) = W_t x_t + V_t c. With z = [x_t; c] and S_t = E[z z^T],

.. math:: L = \sum_t w_t \left(\mathrm{tr}(\theta_t S_t \theta_t^T) - 2\sigma_t \mathrm{tr} W_t + d\right).

The Hessian acts on every row of theta_t as 2 w_t S_t, so its eigenpairs are those of the
(d+m) x (d+m) matrices 2 w_t S_t, each with multiplicity d (one copy per row). The dense
(L d (d+m))^2 Hessian is never formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.problem import DataDistribution, LinearDiffusionProblem, NoiseSchedule

__all__ = [
    "second_moments",
    "target_moments",
    "diffusion_loss",
    "diffusion_grad",
    "HessianEigen",
    "hessian_eigen",
    "hessian_matvec",
    "eigen_coordinates",
    "from_eigen_coordinates",
    "split_params",
    "join_params",
]


def split_params(theta: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    """(W, V) = (theta[..., :d], theta[..., d:]) with shapes ``(L, d, d)`` and ``(L, d, m)``."""
    return theta[..., :dim], theta[..., dim:]


def join_params(w: jax.Array, v: jax.Array) -> jax.Array:
    """Inverse of :func:`split_params`: shape ``(L, d, d + m)``."""
    return jnp.concatenate([w, v], axis=-1)


def second_moments(
    problem: LinearDiffusionProblem, data: DataDistribution
) -> jax.Array:
    r"""Closed-form S_t = E[z z^T] with z = [x_t; c], for every level.

    With M_x = Sigma + sum_j p_j mu_j mu_j^T, M_xc = sum_j p_j mu_j c_j^T, M_c = sum_j p_j c_j c_j^T
    and q = 1 - p_null:

    .. math:: S_t = \begin{pmatrix} \alpha_t^2 M_x + \sigma_t^2 I & q\,\alpha_t M_{xc} \\
                   q\,\alpha_t M_{xc}^T & q\,M_c \end{pmatrix}

    Returns:
      Array of shape ``(L, d + m, d + m)``.
    """
    p, mu, emb = data.probs, data.means, data.embeddings
    keep = 1.0 - data.p_null
    m_x = problem.covariance + (mu * p) @ mu.T
    m_xc = (mu * p) @ emb.T
    m_c = (emb * p) @ emb.T
    a = problem.schedule.alphas[:, None, None]
    s = problem.schedule.sigmas[:, None, None]
    eye = jnp.eye(problem.dim, dtype=m_x.dtype)
    top_left = a**2 * m_x + s**2 * eye
    top_right = keep * a * m_xc
    bottom_right = jnp.broadcast_to(keep * m_c, (a.shape[0],) + m_c.shape)
    top = jnp.concatenate([top_left, top_right], axis=-1)
    bottom = jnp.concatenate([jnp.swapaxes(top_right, -1, -2), bottom_right], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def target_moments(schedule: NoiseSchedule, dim: int, embed_dim: int) -> jax.Array:
    """B_t = E[eps z^T] = [sigma_t I, 0], shape ``(L, d, d + m)``."""
    eye = jnp.eye(dim, dim + embed_dim, dtype=schedule.sigmas.dtype)
    return schedule.sigmas[:, None, None] * eye


def diffusion_loss(theta: jax.Array, moments: jax.Array, schedule: NoiseSchedule) -> jax.Array:
    """Exact expected loss L(theta) = sum_t w_t E||eps_hat - eps||^2 (scalar, squared units of eps).

    Args:
      theta: shape ``(L, d, d + m)``; moments: S_t, shape ``(L, d + m, d + m)``.
    """
    dim = theta.shape[-2]
    quad = jnp.einsum("lij,ljk,lik->l", theta, moments, theta)
    trace_w = jnp.trace(theta[..., :dim], axis1=-2, axis2=-1)
    per_level = quad - 2.0 * schedule.sigmas * trace_w + dim
    return jnp.sum(schedule.weights * per_level)


def diffusion_grad(theta: jax.Array, moments: jax.Array, schedule: NoiseSchedule) -> jax.Array:
    """Gradient 2 w_t (theta_t S_t - B_t), shape ``(L, d, d + m)``."""
    dim, n = theta.shape[-2], theta.shape[-1]
    target = target_moments(schedule, dim, n - dim)
    return 2.0 * schedule.weights[:, None, None] * (theta @ moments - target)


class HessianEigen(NamedTuple):
    """Eigenpairs of the loss Hessian, one (d+m)-dimensional block per level.

    Attributes:
      eigenvalues: shape ``(L, d + m)``, ascending within each level; each has multiplicity d.
      eigenvectors: shape ``(L, d + m, d + m)``; column j of level t is u_{t,j}. The Hessian
        eigenvectors are E_{r} (x) u_{t,j}: the parameter matrix whose row r at level t is u_{t,j}.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array

    @property
    def lambda_max(self) -> jax.Array:
        return jnp.max(self.eigenvalues)


def hessian_eigen(moments: jax.Array, schedule: NoiseSchedule) -> HessianEigen:
    """Eigendecomposition of the Hessian from the blocks 2 w_t S_t (no dense Hessian)."""
    blocks = 2.0 * schedule.weights[:, None, None] * moments
    lam, vecs = jnp.linalg.eigh(blocks)
    return HessianEigen(lam, vecs)


def hessian_matvec(direction: jax.Array, moments: jax.Array, schedule: NoiseSchedule) -> jax.Array:
    """H applied to a parameter-shaped direction: 2 w_t direction_t S_t, shape ``(L, d, d + m)``."""
    return 2.0 * schedule.weights[:, None, None] * (direction @ moments)


def eigen_coordinates(theta_like: jax.Array, eigen: HessianEigen) -> jax.Array:
    """Coordinates <x, E_r (x) u_{t,j}> of a parameter-shaped array: shape ``(L, d, d + m)``."""
    return theta_like @ eigen.eigenvectors


def from_eigen_coordinates(coords: jax.Array, eigen: HessianEigen) -> jax.Array:
    """Inverse of :func:`eigen_coordinates`."""
    return coords @ jnp.swapaxes(eigen.eigenvectors, -1, -2)
