r"""Deterministic DDIM sampling with the linear denoiser, as an exact affine map (theory.md s.2).

Levels l = L-1 (noisiest) .. 0 (least noisy) of the problem's schedule are walked with DDIM
(eta = 0). With classifier-free guidance of scale s the guided prediction is

.. math:: \hat\epsilon = \hat\epsilon(x, 0) + s(\hat\epsilon(x, c) - \hat\epsilon(x, 0)) = W_l x + s V_l c,

and one step from level l to the previous level p (alpha_p = 1, sigma_p = 0 after level 0) is

.. math:: x_p = \frac{\alpha_p}{\alpha_l}(x - \sigma_l\hat\epsilon) + \sigma_p\hat\epsilon
          = (a_l I + k_l W_l) x + k_l s V_l c,\quad a_l = \alpha_p/\alpha_l,\;
          k_l = \sigma_p - a_l\sigma_l .

Composing the steps gives x_0 = M x_T + s N c with x_T ~ N(0, I), so the generated distribution
for prompt c is exactly N(s N c, M M^T).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.problem import LinearDiffusionProblem
from theory.quadratic import split_params

__all__ = [
    "DDIMMap",
    "GeneratedDistribution",
    "ddim_affine",
    "ddim_sample",
    "generated_distribution",
]


class DDIMMap(NamedTuple):
    """x_0 = noise_map @ x_T + prompt_map @ c (guidance already folded into ``prompt_map``).

    Attributes:
      noise_map: M, shape ``(d, d)``.
      prompt_map: N (times the guidance scale), shape ``(d, m)``.
    """

    noise_map: jax.Array
    prompt_map: jax.Array


class GeneratedDistribution(NamedTuple):
    """The exact law of DDIM samples for one prompt: N(mean, cov), cov = M M^T.

    Attributes:
      mean: shape ``(d,)``; cov: shape ``(d, d)``.
    """

    mean: jax.Array
    cov: jax.Array


def _step_coefficients(problem: LinearDiffusionProblem):
    """(a_l, k_l) for l = 0..L-1: x_prev = a_l x + k_l eps_hat."""
    alphas, sigmas = problem.schedule.alphas, problem.schedule.sigmas
    one = jnp.ones((1,), alphas.dtype)
    prev_alphas = jnp.concatenate([one, alphas[:-1]])
    prev_sigmas = jnp.concatenate([jnp.zeros_like(one), sigmas[:-1]])
    a = prev_alphas / alphas
    return a, prev_sigmas - a * sigmas


def ddim_affine(problem: LinearDiffusionProblem, theta: jax.Array, guidance_scale=1.0) -> DDIMMap:
    """The affine DDIM map (M, s N) of the whole sampler for parameters ``theta`` ``(L, d, d+m)``.

    >>> import jax
    >>> from theory.problem import make_problem
    >>> from theory.pretrain import bayes_optimal_denoiser
    >>> p = make_problem(jax.random.PRNGKey(0), dim=4, embed_dim=3, num_concepts=2, num_levels=3)
    >>> ddim_affine(p, bayes_optimal_denoiser(p)).noise_map.shape
    (4, 4)
    """
    w, v = split_params(theta, problem.dim)
    a, k = _step_coefficients(problem)
    eye = jnp.eye(problem.dim, dtype=theta.dtype)

    def step(carry, level):
        m_map, n_map = carry
        w_l, v_l, a_l, k_l = level
        g = a_l * eye + k_l * w_l
        return (g @ m_map, g @ n_map + k_l * guidance_scale * v_l), None

    init = (eye, jnp.zeros((problem.dim, problem.embed_dim), theta.dtype))
    # Walk from the noisiest level down: reverse the level axis.
    (m_map, n_map), _ = jax.lax.scan(step, init, (w[::-1], v[::-1], a[::-1], k[::-1]))
    return DDIMMap(m_map, n_map)


def generated_distribution(
    problem: LinearDiffusionProblem,
    theta: jax.Array,
    prompt_embedding: jax.Array,
    guidance_scale=1.0,
) -> GeneratedDistribution:
    """Exact distribution N(s N c, M M^T) of DDIM samples for prompt embedding c ``(m,)``.

    Vmappable over ``prompt_embedding`` (and over ``theta``). ``guidance_scale`` s = 1 is plain
    conditional sampling; s = 0 samples the unconditional (null-prompt) model.
    """
    ddim = ddim_affine(problem, theta, guidance_scale)
    return GeneratedDistribution(
        ddim.prompt_map @ prompt_embedding, ddim.noise_map @ ddim.noise_map.T
    )


def ddim_sample(
    problem: LinearDiffusionProblem,
    theta: jax.Array,
    noise: jax.Array,
    prompt_embedding: jax.Array,
    guidance_scale=1.0,
) -> jax.Array:
    """Run the DDIM loop step by step on explicit starting noise (the simulation the map replaces).

    Args:
      noise: x_T, shape ``(B, d)``.
      prompt_embedding: c, shape ``(m,)``.

    Returns:
      Samples x_0, shape ``(B, d)``.
    """
    sched = problem.schedule
    w, v = split_params(theta, problem.dim)
    x = noise
    for level in reversed(range(sched.num_levels)):
        eps_uncond = x @ w[level].T
        eps_cond = eps_uncond + v[level] @ prompt_embedding
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x0_pred = (x - sched.sigmas[level] * eps) / sched.alphas[level]
        prev_alpha = sched.alphas[level - 1] if level > 0 else 1.0
        prev_sigma = sched.sigmas[level - 1] if level > 0 else 0.0
        x = prev_alpha * x0_pred + prev_sigma * eps
    return x
