"""Concept presence: closed form vs Monte Carlo, and against an independent NumPy classifier."""

import re

import jax
import numpy as np
import pytest

from theory import concept_distribution, make_problem, pretrain_closed_form
from theory.presence import clip_score, incidental_presence_matrix, presence
from theory.sampling import ddim_sample


@pytest.fixture(scope="module")
def setup():
    problem = make_problem(jax.random.PRNGKey(5), dim=8, embed_dim=6, num_concepts=4, num_levels=4)
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(4, 0.25)))
    return problem, theta_0


def _numpy_presence(problem, theta, c, concept, classes, n, seed):
    """Independent route: the DDIM loop on fresh noise, LDA built from scratch in NumPy."""
    x = np.asarray(
        ddim_sample(
            problem, theta, jax.random.normal(jax.random.PRNGKey(seed), (n, problem.dim)), c
        )
    )
    prec = np.linalg.inv(np.asarray(problem.covariance))
    mus = np.asarray(problem.concept_means)[:, list(classes)]
    scores = x @ prec @ mus - 0.5 * np.einsum("ik,ij,jk->k", mus, prec, mus)
    return np.mean(np.asarray(classes)[np.argmax(scores, axis=1)] == concept), x


def test_two_class_closed_form_vs_monte_carlo(setup):
    problem, theta = setup
    # A prompt between concepts 0 and 1 so the probability is far from 0 and 1.
    c = 0.5 * (problem.embeddings[:, 0] + problem.embeddings[:, 1])
    closed = float(presence(problem, theta, c, 0, classes=(0, 1)))
    assert 0.05 < closed < 0.95
    n = 100_000
    mc, _ = _numpy_presence(problem, theta, c, 0, (0, 1), n, seed=11)
    # Binomial standard error sqrt(p (1 - p) / n); 5 of them.
    assert abs(closed - mc) < 5 * np.sqrt(closed * (1 - closed) / n)
    mc_jax = float(
        presence(problem, theta, c, 0, classes=(0, 1), method="monte_carlo", num_samples=n)
    )
    assert abs(closed - mc_jax) < 5 * np.sqrt(closed * (1 - closed) / n)


def test_k_class_presence_and_clip_score_vs_numpy(setup):
    problem, theta = setup
    c = problem.embeddings[:, 2] + 0.4 * problem.embeddings[:, 3]
    n = 50_000
    ours = float(presence(problem, theta, c, 2, num_samples=n))
    ref, x = _numpy_presence(problem, theta, c, 2, (0, 1, 2, 3), n, seed=12)
    # Two independent estimates: standard error of the difference sqrt(2 p (1 - p) / n).
    assert abs(ours - ref) < 5 * np.sqrt(2 * ref * (1 - ref) / n) + 1e-12
    ref_vec = np.asarray(problem.concept_means[:, 2])
    cos = x @ ref_vec / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref_vec))
    ours_clip = float(clip_score(problem, theta, c, 2, num_samples=n))
    # Cosines lie in [-1, 1]: standard error <= std(cos) / sqrt(n), doubled for two estimates.
    assert abs(ours_clip - cos.mean()) < 5 * np.sqrt(2 / n) * cos.std()


def test_incidental_matrix_rows_are_presences(setup):
    problem, theta = setup
    matrix = np.asarray(incidental_presence_matrix(problem, theta, [0, 3], num_samples=2048))
    for i, f in enumerate([0, 3]):
        for j in range(problem.num_concepts):
            expected = float(
                presence(problem, theta, problem.embeddings[:, j], f, num_samples=2048)
            )
            assert matrix[i, j] == pytest.approx(expected, abs=1e-12)
    # The pretrained model generates its own concept far more often than anything else.
    assert matrix[0, 0] > 0.8 and matrix[1, 3] > 0.5


def test_presence_bad_input(setup):
    problem, theta = setup
    c = problem.embeddings[:, 0]
    with pytest.raises(ValueError, match=re.escape("`concept` must be a concept index in [0, 3]")):
        presence(problem, theta, c, 7)
    with pytest.raises(ValueError, match=re.escape("needs exactly two `classes`")):
        presence(problem, theta, c, 0, method="closed_form")
    with pytest.raises(
        ValueError,
        match=re.escape("`method` must be one of ('auto', 'closed_form', 'monte_carlo')"),
    ):
        presence(problem, theta, c, 0, method="exact")


def test_fixed_key_normals_are_constants_of_the_program_and_traced_keys_still_sample():
    """standard_normal_draws is jax.random.normal bit for bit: drawn while tracing for a concrete
    key (no sampler in the compiled program), traced as usual for a traced key."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from theory.presence import standard_normal_draws

    key = jax.random.PRNGKey(0)
    eager = np.asarray(jax.random.normal(key, (64, 3), jnp.float64))
    fixed = jax.jit(lambda scale: scale * standard_normal_draws(key, (64, 3), jnp.float64))
    np.testing.assert_array_equal(np.asarray(fixed(1.0)), eager)
    hlo = fixed.lower(1.0).as_text()
    assert "threefry" not in hlo and "erf_inv" not in hlo, "the sampler was compiled in"
    seeds = jnp.arange(3)
    traced = jax.jit(jax.vmap(lambda s: standard_normal_draws(jax.random.PRNGKey(s), (4,), jnp.float64)))
    expected = np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(s), (4,), jnp.float64)) for s in range(3)])
    np.testing.assert_array_equal(np.asarray(traced(seeds)), expected)
