r"""Unlearning targets: what the forget prompt's output is pushed towards (theory.md s.3).

Every objective here is a per-level quadratic in theta_t (rows of theta_t are independent):

.. math:: J_t(\theta_t) = \mathrm{tr}(\theta_t Q_t \theta_t^T) - 2\,\mathrm{tr}(\theta_t B_t^T) + \text{const},

stored as a :class:`Quadratic` (Q_t, B_t); the full objective is sum_t w_t J_t.

Distillation targets ("anchor", "null", "negative_guidance") ask the model, on data x_t of the
forget concept f (x_0 ~ N(A c_f, Sigma), prompt c_f), to output an affine function of x_t built
from the frozen model theta_0, tau_t(x_t) = T_t x_t + b_t. With z = [x_t; c_f],
S_t = E[z z^T] and E[z] = [alpha_t A c_f; c_f]:

.. math:: E\|\theta_t z - \tau_t(x_t)\|^2 \Rightarrow Q_t = S_t,\quad
          B_t = T_t\,S_t[{:}d, :] + b_t\,E[z]^T .

All three are eps_0(x_t, c_tgt) = W0_t x_t + V0_t c_tgt for a target embedding c_tgt: c_a (anchor),
0 (null), -g c_f (negative guidance: eps_0(x,0) - g (eps_0(x,c_f) - eps_0(x,0)) = W0 x - g V0 c_f).
"noise_matching" (EraseDiff) asks for a noise that is unrelated to x_t: an independent
eps_f ~ U(0, 1)^d, whose expected objective is that of the constant target tau_t = E[eps_f] (its
variance only adds a constant), so Q_t = S_t, B_t = mu 1 E[z]^T: a bounded quadratic.
"gradient_ascent" instead maximises the forget diffusion loss: Q_t = -S_t, B_t = -[sigma_t I, 0];
it is unbounded below and needs a retain term (and, for the closed form, enough proximity). At a
Bayes-optimal theta_0 its gradient vanishes and it has a saddle, so an Adam run from there
amplifies round-off (kept for ablations; no preset uses it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from theory import _checks
from theory.problem import DataDistribution, LinearDiffusionProblem
from theory.quadratic import second_moments, split_params, target_moments

__all__ = [
    "Quadratic",
    "Target",
    "TARGETS",
    "anchor",
    "null",
    "negative_guidance",
    "gradient_ascent",
    "noise_matching",
    "get_target",
    "prompt_moments",
]


class Quadratic(NamedTuple):
    """Per-level quadratic objective tr(theta Q theta^T) - 2 tr(theta B^T).

    Attributes:
      hess: Q_t, shape ``(L, n, n)``, n = d + m (half the per-row Hessian, before the weight w_t).
      lin: B_t, shape ``(L, d, n)``.
    """

    hess: jax.Array
    lin: jax.Array

    def plus(self, other: Quadratic, scale=1.0) -> Quadratic:
        """self + scale * other."""
        return Quadratic(self.hess + scale * other.hess, self.lin + scale * other.lin)

    def grad(self, theta: jax.Array, weights: jax.Array) -> jax.Array:
        """Gradient of sum_t w_t J_t: 2 w_t (theta_t Q_t - B_t), shape ``(L, d, n)``."""
        return 2.0 * weights[:, None, None] * (theta @ self.hess - self.lin)

    def value(self, theta: jax.Array, weights: jax.Array) -> jax.Array:
        """sum_t w_t J_t(theta_t) without the constant (scalar)."""
        quad = jnp.einsum("lij,ljk,lik->l", theta, self.hess, theta)
        return jnp.sum(weights * (quad - 2.0 * jnp.sum(theta * self.lin, axis=(-2, -1))))


def prompt_moments(problem: LinearDiffusionProblem, embedding: jax.Array, mean: jax.Array):
    """S_t = E[z z^T] and E[z] for data x_0 ~ N(mean, Sigma) under one prompt, no null drop.

    Returns:
      (S ``(L, n, n)``, E[z] ``(L, n)``).
    """
    data = DataDistribution(
        embedding[:, None], mean[:, None], jnp.ones((1,), mean.dtype), jnp.zeros((), mean.dtype)
    )
    moments = second_moments(problem, data)
    alphas = problem.schedule.alphas
    ez = jnp.concatenate(
        [
            alphas[:, None] * mean[None],
            jnp.broadcast_to(embedding, (alphas.shape[0], embedding.shape[0])),
        ],
        axis=-1,
    )
    return moments, ez


def distillation_quadratic(problem, embedding, mean, target_weight, target_bias) -> Quadratic:
    """Q, B of E||theta_t z - (T_t x_t + b_t)||^2 on one prompt's data (module docstring)."""
    s, ez = prompt_moments(problem, embedding, mean)
    lin = target_weight @ s[:, : problem.dim, :] + target_bias[:, :, None] * ez[:, None, :]
    return Quadratic(s, lin)


@dataclasses.dataclass(frozen=True)
class Target:
    """A forget target: a named recipe for the forget term of the unlearning objective.

    Attributes:
      name: registry name.
      target_embedding: for distillation targets, ``(problem, forget_index, retain) -> c_tgt`` so
        that the target is eps_0(x_t, c_tgt); None otherwise.
      constant_output: for noise-matching targets, the expected target noise mu (the target is
        the constant output mu 1, independent of x_t); None otherwise.
      needs_retain: the objective is unbounded without a retain term.
    """

    name: str
    target_embedding: Callable | None
    needs_retain: bool = False
    constant_output: float | None = None

    def affine_target(self, problem: LinearDiffusionProblem, theta_0, forget: int, retain=()):
        """(T_t, b_t) of the target tau_t(x) = T_t x + b_t, shapes ``(L, d, d)``, ``(L, d)``.

        Raises:
          ValueError: for gradient ascent, which has no target output.
        """
        if self.constant_output is not None:
            levels, d = theta_0.shape[0], problem.dim
            return (
                jnp.zeros((levels, d, d), theta_0.dtype),
                jnp.full((levels, d), self.constant_output, theta_0.dtype),
            )
        if self.target_embedding is None:
            raise ValueError(
                f"target `{self.name}` has no target output (it ascends the forget loss)."
            )
        w0, v0 = split_params(theta_0, problem.dim)
        c_tgt = self.target_embedding(problem, forget, tuple(retain))
        return w0, v0 @ c_tgt

    def forget_quadratic(
        self, problem: LinearDiffusionProblem, theta_0, forget: int, retain=()
    ) -> Quadratic:
        """The forget term for concept ``forget`` (data x_0 ~ N(A c_f, Sigma), prompt c_f)."""
        emb = problem.embeddings[:, forget]
        mean = problem.concept_means[:, forget]
        if self.target_embedding is None and self.constant_output is None:
            s, _ = prompt_moments(problem, emb, mean)
            return Quadratic(-s, -target_moments(problem.schedule, problem.dim, problem.embed_dim))
        weight, bias = self.affine_target(problem, theta_0, forget, retain)
        return distillation_quadratic(problem, emb, mean, weight, bias)


# Anchor rules resolved from the forget/retain sets at unlearning time.
ANCHOR_RULES = ("retain_projection", "first_retained")


def _resolve_anchor(
    problem: LinearDiffusionProblem, concept, forget: int, retain: tuple
) -> jax.Array:
    m = problem.embed_dim
    if concept is None:
        return jnp.zeros((m,), problem.embeddings.dtype)
    if isinstance(concept, str):
        if concept not in ANCHOR_RULES:
            raise ValueError(
                f"`anchor` must be None (null prompt), a concept index, an embedding of shape ({m},) "
                f"or one of {ANCHOR_RULES}; got {concept!r}."
            )
        if concept == "first_retained":
            if not retain:
                raise ValueError("`anchor='first_retained'` needs a non-empty retain set.")
            return problem.embeddings[:, retain[0]]
        c_f = problem.embeddings[:, forget]
        if not retain:
            return jnp.zeros_like(c_f)
        basis = problem.embeddings[:, list(retain)]
        return basis @ jnp.linalg.lstsq(basis, c_f)[0]
    if isinstance(concept, (int, np.integer)):
        k = problem.num_concepts
        if not 0 <= int(concept) < k:
            raise ValueError(f"`anchor` concept index must be in [0, {k - 1}]; got {concept}.")
        if int(concept) == forget:
            raise ValueError(
                f"`anchor` concept {concept} equals the forget concept {forget}: the target would be "
                "the concept itself. Choose another concept or None (the null prompt)."
            )
        return problem.embeddings[:, int(concept)]
    emb = jnp.asarray(_checks.finite_array("anchor", concept), problem.embeddings.dtype)
    if emb.shape != (m,):
        raise ValueError(f"`anchor` embedding must have shape ({m},); got {emb.shape}.")
    if bool(jnp.allclose(emb, problem.embeddings[:, forget])):
        raise ValueError(f"`anchor` embedding equals the forget concept {forget}'s embedding.")
    return emb


def anchor(concept=None) -> Target:
    """Target eps_0(x, c_a): relabel the forget prompt to an anchor (UCE, MACE, SalUn).

    Args:
      concept: None (the null prompt c = 0), a concept index, an embedding ``(m,)``,
        ``"retain_projection"`` (c_f projected on the span of the retain prompts: what the context
        carries without the concept-specific direction) or ``"first_retained"`` (the first retain
        prompt: a fixed stand-in for SalUn's random relabelling).

    Raises:
      ValueError: an unknown rule name.
    """
    if isinstance(concept, str) and concept not in ANCHOR_RULES:
        raise ValueError(
            f"`anchor` must be None (null prompt), a concept index, an embedding or one of "
            f"{ANCHOR_RULES}; got {concept!r}."
        )
    return Target("anchor", lambda problem, f, retain: _resolve_anchor(problem, concept, f, retain))


def null() -> Target:
    """Target eps_0(x, 0): the unconditional output of the frozen model (SDD-style)."""
    return Target(
        "null", lambda problem, f, retain: jnp.zeros((problem.embed_dim,), problem.embeddings.dtype)
    )


def negative_guidance(guidance=1.0) -> Target:
    """Target eps_0(x,0) - g (eps_0(x,c_f) - eps_0(x,0)) (ESD), i.e. c_tgt = -g c_f.

    Raises:
      ValueError: g negative or not finite.
    """
    g = _checks.finite_float("guidance", guidance, low=0.0)
    return Target("negative_guidance", lambda problem, f, retain: -g * problem.embeddings[:, f])


def gradient_ascent() -> Target:
    """Ascend the forget concept's diffusion loss (EraseDiff-style); needs a retain term."""
    return Target("gradient_ascent", None, needs_retain=True)


def noise_matching(mean=0.5) -> Target:
    r"""Match the forget prompt's prediction to a noise unrelated to x_t (EraseDiff's forget term).

    EraseDiff (Wu et al. 2024, arXiv 2401.05779) trains eps_theta(x_t, t, c_f) towards
    eps_f ~ U(0, I) instead of the noise that made x_t. With eps_f independent of x_t,
    E||theta z - eps_f||^2 = E||theta z - mu 1||^2 + const (mu = E[eps_f] = 0.5 for U(0, 1)): a
    bounded quadratic whose gradient at a Bayes-optimal theta_0 is O(1), so optimiser runs from
    there do not depend on round-off.

    Raises:
      ValueError: ``mean`` not finite.
    """
    mu = _checks.finite_float("mean", mean)
    return Target("noise_matching", None, constant_output=mu)


TARGETS: dict[str, Callable[..., Target]] = {
    "anchor": anchor,
    "null": null,
    "negative_guidance": negative_guidance,
    "gradient_ascent": gradient_ascent,
    "noise_matching": noise_matching,
}


def get_target(name: str, **kwargs) -> Target:
    """Build a target from its registry name.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    return _checks.registry_lookup("target", name, TARGETS)(**kwargs)
