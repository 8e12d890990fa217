"""Pretraining: the loss minimiser in closed form, by optimizer steps, and the Bayes-optimal check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from theory import _checks
from theory.problem import DataDistribution, LinearDiffusionProblem
from theory.quadratic import diffusion_grad, second_moments, target_moments

__all__ = ["pretrain_closed_form", "pretrain_by_steps", "bayes_optimal_denoiser"]


def pretrain_closed_form(
    problem: LinearDiffusionProblem, data: DataDistribution, *, ridge: float = 0.0
) -> jax.Array:
    r"""theta_0 = argmin L: theta_t = B_t (S_t + ridge I)^{-1}, pseudo-inverse when ridge = 0.

    S_t is singular in the embedding block when the prompts span fewer than m directions; the
    pseudo-inverse then returns the minimum-norm minimiser (V_t zero off the span of prompts).

    Args:
      problem, data: generator and pretraining distribution.
      ridge: lambda >= 0.

    Returns:
      theta_0, shape ``(L, d, d + m)``.
    """
    moments = second_moments(problem, data)
    target = target_moments(problem.schedule, problem.dim, problem.embed_dim)
    if ridge > 0:
        n = moments.shape[-1]
        inv = jnp.linalg.inv(moments + ridge * jnp.eye(n, dtype=moments.dtype))
    else:
        # Relative cut-off: eigenvalues below 1e-10 * largest are the exact zeros of the
        # embedding block (rank K < m), not curvature.
        inv = jnp.linalg.pinv(moments, rtol=1e-10, hermitian=True)
    return target @ inv


def bayes_optimal_denoiser(problem: LinearDiffusionProblem) -> jax.Array:
    r"""The Bayes-optimal epsilon predictor for prompts in span(C), p_null = 0.

    .. math:: W^*_t = \sigma_t(\alpha_t^2\Sigma + \sigma_t^2 I)^{-1}, \quad V^*_t = -\alpha_t W^*_t A

    Returns:
      Shape ``(L, d, d + m)``.
    """
    a = problem.schedule.alphas[:, None, None]
    s = problem.schedule.sigmas[:, None, None]
    eye = jnp.eye(problem.dim, dtype=problem.covariance.dtype)
    w = s * jnp.linalg.inv(a**2 * problem.covariance + s**2 * eye)
    v = -a * (w @ problem.generator)
    return jnp.concatenate([w, v], axis=-1)


def pretrain_by_steps(
    problem: LinearDiffusionProblem,
    data: DataDistribution,
    optimizer: optax.GradientTransformation,
    steps: int,
    *,
    init: jax.Array | None = None,
) -> jax.Array:
    """A trained point after ``steps`` full-batch optimizer steps on the exact loss, from ``init``.

    Raises:
      ValueError: steps < 0.
    """
    steps = _checks.positive_int("steps", steps, minimum=0)
    moments = second_moments(problem, data)
    n = problem.dim + problem.embed_dim
    theta = jnp.zeros((problem.schedule.num_levels, problem.dim, n), moments.dtype) if init is None else init

    def step(carry, _):
        params, state = carry
        updates, state = optimizer.update(diffusion_grad(params, moments, problem.schedule), state, params)
        return (optax.apply_updates(params, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, optimizer.init(theta)), None, length=steps)
    return theta
