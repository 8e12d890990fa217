"""Problem construction for the linear conditional diffusion model (theory.md section 1).

Image space R^d, prompt-embedding space R^m, K concepts with embeddings c_k (columns of
``embeddings``), true generator x0 | k ~ N(A c_k, Sigma), VP noise levels
x_t = alpha_t x0 + sigma_t eps. Everything is a frozen dataclass pytree: arrays are leaves, so a
whole problem can be vmapped over and passed through ``jit``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from theory import _checks
from theory._precision import warn_once_if_float32

__all__ = [
    "NoiseSchedule",
    "LinearDiffusionProblem",
    "DataDistribution",
    "make_noise_schedule",
    "make_embeddings",
    "make_problem",
    "concept_distribution",
    "new_concept_distribution",
    "problem_from_arrays",
]


@partial(jax.tree_util.register_dataclass, data_fields=["alphas", "sigmas", "weights"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """VP noise levels: ``alphas``, ``sigmas``, ``weights`` each of shape ``(L,)``.

    alpha_t^2 + sigma_t^2 = 1; ``weights`` w_t >= 0 multiply each level's loss.
    """

    alphas: jax.Array
    sigmas: jax.Array
    weights: jax.Array

    @property
    def num_levels(self) -> int:
        return self.alphas.shape[-1]


def make_noise_schedule(
    num_levels: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> NoiseSchedule:
    """Stable Diffusion's scaled-linear VP schedule, read at ``num_levels`` evenly spaced steps.

    Level l uses training timestep ``(l + 1) * N // L - 1`` (l = 0 is the least noisy), and the
    weights are uniform (1/L), as SD samples timesteps uniformly in training.

    Args:
      num_levels: L >= 1.
      num_train_timesteps: N >= L, the discrete timesteps of the schedule.
      beta_start, beta_end: 0 < beta_start <= beta_end < 1.

    Returns:
      NoiseSchedule with arrays of shape ``(L,)``.

    Raises:
      ValueError: for sizes < 1, L > N, or betas outside (0, 1).

    >>> s = make_noise_schedule(4)
    >>> bool(jnp.allclose(s.alphas**2 + s.sigmas**2, 1.0))
    True
    """
    num_levels = _checks.positive_int("num_levels", num_levels)
    num_train_timesteps = _checks.positive_int("num_train_timesteps", num_train_timesteps, minimum=num_levels)
    beta_start = _checks.finite_float("beta_start", beta_start, low=0, high=1, low_open=True, high_open=True)
    beta_end = _checks.finite_float("beta_end", beta_end, low=beta_start, high=1, high_open=True)
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    idx = (np.arange(num_levels) + 1) * num_train_timesteps // num_levels - 1
    ab = alpha_bar[idx]
    return NoiseSchedule(
        alphas=jnp.asarray(np.sqrt(ab)),
        sigmas=jnp.asarray(np.sqrt(1.0 - ab)),
        weights=jnp.full((num_levels,), 1.0 / num_levels),
    )


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["generator", "covariance", "embeddings", "schedule"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LinearDiffusionProblem:
    """The true generator and noise schedule.

    Attributes:
      generator: A, shape ``(d, m)``; concept k has mean ``A @ embeddings[:, k]``.
      covariance: Sigma, SPD, shape ``(d, d)``.
      embeddings: C, concept embeddings as columns, shape ``(m, K)``.
      schedule: the L noise levels.
    """

    generator: jax.Array
    covariance: jax.Array
    embeddings: jax.Array
    schedule: NoiseSchedule

    @property
    def dim(self) -> int:
        return self.generator.shape[-2]

    @property
    def embed_dim(self) -> int:
        return self.generator.shape[-1]

    @property
    def num_concepts(self) -> int:
        return self.embeddings.shape[-1]

    @property
    def concept_means(self) -> jax.Array:
        """A C, shape ``(d, K)``."""
        return self.generator @ self.embeddings


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["embeddings", "means", "probs", "p_null"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class DataDistribution:
    """A training (or forget) distribution over prompts.

    Prompt j has embedding ``embeddings[:, j]`` and images x0 ~ N(means[:, j], Sigma). With
    probability ``p_null`` the prompt is replaced by the null prompt c = 0 (classifier-free
    guidance dropout); the image still comes from prompt j.

    Attributes:
      embeddings: shape ``(m, J)``.
      means: shape ``(d, J)``; ``A @ embeddings`` for in-distribution data.
      probs: shape ``(J,)``, sums to one.
      p_null: scalar in [0, 1).
    """

    embeddings: jax.Array
    means: jax.Array
    probs: jax.Array
    p_null: jax.Array


def _check_distribution(embeddings, means, probs, p_null, problem: LinearDiffusionProblem):
    emb = _checks.finite_array("embeddings", embeddings)
    mu = _checks.finite_array("means", means)
    p = _checks.probability_vector("probs", probs)
    _checks.finite_float("p_null", p_null, low=0.0, high=1.0, high_open=True)
    if emb.ndim != 2 or emb.shape[0] != problem.embed_dim:
        raise ValueError(f"`embeddings` must have shape (m={problem.embed_dim}, J); got {emb.shape}.")
    if mu.shape != (problem.dim, emb.shape[1]):
        raise ValueError(f"`means` must have shape (d={problem.dim}, J={emb.shape[1]}); got {mu.shape}.")
    if p.shape != (emb.shape[1],):
        raise ValueError(f"`probs` must have one entry per prompt (J={emb.shape[1]}); got {p.shape}.")
    return emb, mu, p


def concept_distribution(
    problem: LinearDiffusionProblem, probs, *, p_null: float = 0.0
) -> DataDistribution:
    """In-distribution data: prompts are the problem's concepts, images from the true generator.

    Args:
      problem: the generator.
      probs: shape ``(K,)``, probability of each concept (zeros exclude a concept).
      p_null: null-prompt drop probability in [0, 1).

    Returns:
      DataDistribution with means ``A C``.

    Raises:
      ValueError: probs not a probability vector of length K, or p_null outside [0, 1).
    """
    emb, mu, p = _check_distribution(problem.embeddings, problem.concept_means, probs, p_null, problem)
    return DataDistribution(
        embeddings=jnp.asarray(emb), means=jnp.asarray(mu), probs=jnp.asarray(p), p_null=jnp.asarray(float(p_null))
    )


def new_concept_distribution(
    problem: LinearDiffusionProblem, embeddings, means, probs, *, p_null: float = 0.0
) -> DataDistribution:
    """Data from new concepts (a shifted target): arbitrary embeddings and image means.

    Raises:
      ValueError: shapes that do not match the problem, non-finite entries, bad probs or p_null.
    """
    emb, mu, p = _check_distribution(embeddings, means, probs, p_null, problem)
    return DataDistribution(
        embeddings=jnp.asarray(emb), means=jnp.asarray(mu), probs=jnp.asarray(p), p_null=jnp.asarray(float(p_null))
    )


def make_embeddings(key: jax.Array, embed_dim: int, num_concepts: int, common_component: float) -> jax.Array:
    """Unit concept embeddings with pairwise cosine exactly ``common_component`` (rho_c).

    c_k = sqrt(rho_c) c_common + sqrt(1 - rho_c) u_k with c_common, u_1..u_K orthonormal
    (needs K + 1 <= m); CLIP text embeddings of unrelated prompts share such a component.

    Returns:
      Array of shape ``(m, K)``.

    Raises:
      ValueError: K + 1 > m, or rho_c outside [0, 1).
    """
    embed_dim = _checks.positive_int("embed_dim", embed_dim)
    num_concepts = _checks.positive_int("num_concepts", num_concepts)
    rho_c = _checks.finite_float("common_component", common_component, low=0.0, high=1.0, high_open=True)
    if num_concepts + 1 > embed_dim:
        raise ValueError(
            f"`num_concepts` + 1 must be <= `embed_dim` for exactly controlled cosines; "
            f"got num_concepts={num_concepts}, embed_dim={embed_dim}."
        )
    basis, _ = jnp.linalg.qr(jax.random.normal(key, (embed_dim, num_concepts + 1)))
    return jnp.sqrt(rho_c) * basis[:, :1] + jnp.sqrt(1.0 - rho_c) * basis[:, 1:]


def make_problem(
    key: jax.Array,
    *,
    dim: int = 16,
    embed_dim: int = 8,
    num_concepts: int = 5,
    num_levels: int = 10,
    spectrum_decay: float = 1.0,
    common_component: float = 0.3,
    generator_scale: float = 1.0,
) -> LinearDiffusionProblem:
    """A random problem: Sigma = Q diag(i^-alpha) Q^T in a random basis, Gaussian A.

    Args:
      key: PRNG key.
      dim: d, image dimension.
      embed_dim: m, prompt-embedding dimension (>= num_concepts + 1).
      num_concepts: K.
      num_levels: L noise levels (SD scaled-linear schedule).
      spectrum_decay: alpha >= 0 of the power-law covariance spectrum s_i = i^-alpha.
      common_component: rho_c in [0, 1), the pairwise cosine of concept embeddings.
      generator_scale: A has i.i.d. N(0, scale^2 / m) entries, so ||A c|| ~ scale for unit c.

    Returns:
      LinearDiffusionProblem.

    Raises:
      ValueError: non-positive sizes, negative or non-finite decay/scale, rho_c outside [0, 1).
    """
    warn_once_if_float32("make_problem")
    dim = _checks.positive_int("dim", dim)
    embed_dim = _checks.positive_int("embed_dim", embed_dim)
    decay = _checks.finite_float("spectrum_decay", spectrum_decay, low=0.0)
    scale = _checks.finite_float("generator_scale", generator_scale, low=0.0, low_open=True)
    k_basis, k_gen, k_emb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_basis, (dim, dim)))
    spectrum = jnp.arange(1, dim + 1, dtype=q.dtype) ** (-decay)
    covariance = (q * spectrum) @ q.T
    covariance = 0.5 * (covariance + covariance.T)
    generator = jax.random.normal(k_gen, (dim, embed_dim), dtype=q.dtype) * (scale / np.sqrt(embed_dim))
    embeddings = make_embeddings(k_emb, embed_dim, num_concepts, common_component)
    return LinearDiffusionProblem(generator, covariance, embeddings, make_noise_schedule(num_levels))


def problem_from_arrays(generator, covariance, embeddings, schedule: NoiseSchedule) -> LinearDiffusionProblem:
    """Build a problem from user arrays, checking shapes, finiteness and that Sigma is SPD.

    Raises:
      ValueError: mismatched shapes, non-finite entries, or a covariance that is not SPD.
    """
    warn_once_if_float32("problem_from_arrays")
    a = _checks.finite_array("generator", generator)
    if a.ndim != 2:
        raise ValueError(f"`generator` must be a (d, m) matrix; got shape {a.shape}.")
    s = _checks.spd_matrix("covariance", covariance)
    c = _checks.finite_array("embeddings", embeddings)
    if s.shape[0] != a.shape[0]:
        raise ValueError(f"`covariance` must be (d, d) with d={a.shape[0]}; got {s.shape}.")
    if c.ndim != 2 or c.shape[0] != a.shape[1]:
        raise ValueError(f"`embeddings` must be (m={a.shape[1]}, K); got {c.shape}.")
    return LinearDiffusionProblem(jnp.asarray(a), jnp.asarray(s), jnp.asarray(c), schedule)
