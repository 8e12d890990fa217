r"""Concept presence in generated samples: the linear model's concept classifier (theory.md s.2).

The detector is the Bayes classifier of the *true* generator over the K concepts: equal priors,
classes N(mu_k, Sigma) with mu_k = A c_k, i.e. linear discriminant analysis with scores

.. math:: s_k(x) = \mu_k^T\Sigma^{-1}x - \tfrac12\mu_k^T\Sigma^{-1}\mu_k .

Presence of concept f under prompt c is P(argmax_k s_k(x) = f) for x from the exact DDIM law
N(s N c, M M^T) (:mod:`theory.sampling`). For two candidate classes this is a Gaussian CDF; for more
it is a Monte-Carlo average with a fixed key (common random numbers across prompts and stages, so
differences between stages carry little Monte-Carlo noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from theory import _checks
from theory.problem import LinearDiffusionProblem
from theory.sampling import ddim_affine

__all__ = [
    "LDAClassifier",
    "lda_classifier",
    "presence",
    "presence_two_class",
    "presence_monte_carlo",
    "standard_normal_draws",
    "clip_score",
    "incidental_presence_matrix",
    "DEFAULT_NUM_SAMPLES",
]

# 4096 samples: Monte-Carlo standard error <= 0.5/sqrt(4096) ~ 0.008 on a probability.
DEFAULT_NUM_SAMPLES = 4096


class LDAClassifier(NamedTuple):
    """Scores s(x) = weights @ x + biases over the candidate classes.

    Attributes:
      weights: Sigma^{-1} mu_k as rows, shape ``(K', d)``.
      biases: -mu_k^T Sigma^{-1} mu_k / 2, shape ``(K',)``.
      classes: the concept index of each row, shape ``(K',)``.
    """

    weights: jax.Array
    biases: jax.Array
    classes: jax.Array


def lda_classifier(problem: LinearDiffusionProblem, classes=None) -> LDAClassifier:
    """The Bayes (LDA) classifier of the true generator over ``classes`` (default: all K)."""
    idx = jnp.arange(problem.num_concepts) if classes is None else jnp.asarray(classes)
    means = problem.concept_means[:, idx]  # (d, K')
    prec_means = jnp.linalg.solve(problem.covariance, means)  # Sigma^{-1} mu_k
    return LDAClassifier(prec_means.T, -0.5 * jnp.sum(means * prec_means, axis=0), idx)


def _check_classes(problem, concept, classes):
    k = problem.num_concepts
    concept = _checks.positive_int("concept", concept, minimum=0)
    if concept >= k:
        raise ValueError(f"`concept` must be a concept index in [0, {k - 1}]; got {concept}.")
    if classes is None:
        classes = tuple(range(k))
    classes = tuple(int(c) for c in classes)
    if (
        len(set(classes)) != len(classes)
        or any(c < 0 or c >= k for c in classes)
        or len(classes) < 2
    ):
        raise ValueError(
            f"`classes` must be >= 2 distinct concept indices in [0, {k - 1}]; got {classes}."
        )
    if concept not in classes:
        raise ValueError(f"`concept` {concept} must be one of `classes` {classes}.")
    return concept, classes


def presence_two_class(mean, noise_map, weights, biases) -> jax.Array:
    r"""P(s_0(x) > s_1(x)) for x ~ N(mean, M M^T), in closed form.

    .. math:: P = \Phi\!\left(\frac{u^T m + b}{\|M^T u\|}\right),\quad u = w_0 - w_1,\; b = b_0 - b_1

    Args:
      mean: ``(d,)``; noise_map: M ``(d, d)``; weights ``(2, d)`` and biases ``(2,)`` with the
        concept of interest first.
    """
    u = weights[0] - weights[1]
    b = biases[0] - biases[1]
    return ndtr((u @ mean + b) / jnp.linalg.norm(noise_map.T @ u))


def standard_normal_draws(key, shape, dtype) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``; with a concrete key (the fixed default), drawn
    once while tracing and embedded as a constant, so a compiled program does not carry its own
    copy of the sampler (each copy cost ~0.13 s of XLA compile; a sweep's observables had four)."""
    with jax.ensure_compile_time_eval():
        return jax.random.normal(key, shape, dtype)


def presence_monte_carlo(mean, noise_map, weights, biases, key, num_samples: int) -> jax.Array:
    """Fraction of x = mean + M eps (eps ~ N(0, I), ``num_samples`` draws from ``key``) whose
    highest score is row 0 of ``weights``."""
    eps = standard_normal_draws(key, (num_samples, mean.shape[0]), mean.dtype)
    scores = (mean + eps @ noise_map.T) @ weights.T + biases
    return jnp.mean(jnp.argmax(scores, axis=-1) == 0)


def _ordered(clf: LDAClassifier, concept: int, classes: tuple[int, ...]):
    order = jnp.asarray(
        [classes.index(concept)] + [i for i, c in enumerate(classes) if c != concept]
    )
    return clf.weights[order], clf.biases[order]


def presence(
    problem: LinearDiffusionProblem,
    theta: jax.Array,
    prompt_embedding: jax.Array,
    concept: int,
    *,
    guidance_scale=1.0,
    classes: Sequence[int] | None = None,
    method: str = "auto",
    key: jax.Array | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
) -> jax.Array:
    """Probability that a DDIM sample for ``prompt_embedding`` is classified as ``concept``.

    Args:
      problem: the true generator (defines the classifier).
      theta: model parameters ``(L, d, d+m)``.
      prompt_embedding: c, shape ``(m,)``.
      concept: index f of the concept to detect.
      guidance_scale: classifier-free guidance scale s.
      classes: candidate concepts of the classifier (default all K); must contain ``concept``.
      method: ``"auto"`` (closed form for two classes, Monte Carlo otherwise), ``"closed_form"``
        (two classes only) or ``"monte_carlo"``.
      key: PRNG key for Monte Carlo (default ``PRNGKey(0)``: fixed, so results are reproducible).
      num_samples: Monte-Carlo sample count.

    Returns:
      Scalar probability in [0, 1].

    Raises:
      ValueError: bad concept/classes, unknown method, closed form asked for more than two classes.
    """
    concept, classes = _check_classes(problem, concept, classes)
    methods = ("auto", "closed_form", "monte_carlo")
    if method not in methods:
        raise ValueError(f"`method` must be one of {methods}; got {method!r}.")
    if method == "closed_form" and len(classes) != 2:
        raise ValueError(f"`method='closed_form'` needs exactly two `classes`; got {classes}.")
    use_closed = method == "closed_form" or (method == "auto" and len(classes) == 2)
    key = jax.random.PRNGKey(0) if key is None else key
    weights, biases = _ordered(lda_classifier(problem, classes), concept, classes)
    ddim = ddim_affine(problem, theta, guidance_scale)
    mean = ddim.prompt_map @ prompt_embedding
    if use_closed:
        return presence_two_class(mean, ddim.noise_map, weights, biases)
    _checks.positive_int("num_samples", num_samples)
    return presence_monte_carlo(mean, ddim.noise_map, weights, biases, key, num_samples)


def clip_score(
    problem: LinearDiffusionProblem,
    theta: jax.Array,
    prompt_embedding: jax.Array,
    concept: int,
    *,
    guidance_scale=1.0,
    key: jax.Array | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
) -> jax.Array:
    """CLIP-like score: E[cos(x, A c_f)] over DDIM samples x for ``prompt_embedding`` (Monte Carlo,
    fixed key). Dimensionless, in [-1, 1]."""
    key = jax.random.PRNGKey(0) if key is None else key
    ddim = ddim_affine(problem, theta, guidance_scale)
    eps = standard_normal_draws(key, (num_samples, problem.dim), theta.dtype)
    x = ddim.prompt_map @ prompt_embedding + eps @ ddim.noise_map.T
    ref = problem.concept_means[:, concept]
    cos = (x @ ref) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(ref))
    return jnp.mean(cos)


def incidental_presence_matrix(
    problem: LinearDiffusionProblem,
    theta: jax.Array,
    concepts: Sequence[int],
    *,
    prompts: jax.Array | None = None,
    guidance_scale=1.0,
    key: jax.Array | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
) -> jax.Array:
    """Presence of each concept in ``concepts`` (rows) under every prompt (columns).

    Args:
      concepts: F concept indices (e.g. the erased ones).
      prompts: prompt embeddings as columns ``(m, J)``; default the K concept embeddings.
      Other arguments as in :func:`presence` (K-class classifier, Monte Carlo with a fixed key;
      closed form when K = 2).

    Returns:
      Shape ``(F, J)``; entry (i, j) is the presence of ``concepts[i]`` under prompt j.
    """
    concepts = [int(c) for c in np.atleast_1d(np.asarray(concepts))]
    for c in concepts:
        _check_classes(problem, c, None)
    prompts = problem.embeddings if prompts is None else jnp.asarray(prompts)
    key = jax.random.PRNGKey(0) if key is None else key
    clf = lda_classifier(problem)
    ddim = ddim_affine(problem, theta, guidance_scale)
    means = (ddim.prompt_map @ prompts).T  # (J, d)
    classes = tuple(range(problem.num_concepts))
    rows = []
    for c in concepts:
        weights, biases = _ordered(clf, c, classes)
        if len(classes) == 2:
            fn = lambda mu, w=weights, b=biases: presence_two_class(mu, ddim.noise_map, w, b)  # noqa: E731
        else:
            fn = lambda mu, w=weights, b=biases: presence_monte_carlo(  # noqa: E731
                mu, ddim.noise_map, w, b, key, num_samples
            )
        rows.append(jax.vmap(fn)(means))
    return jnp.stack(rows)
