"""Affine DDIM (theory.sampling) against the step-by-step DDIM loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import concept_distribution, make_problem, pretrain_closed_form
from theory.sampling import ddim_affine, ddim_sample, generated_distribution
from theory.testing import assert_allclose_report


@pytest.fixture(scope="module")
def setup():
    problem = make_problem(jax.random.PRNGKey(3), dim=8, embed_dim=6, num_concepts=4, num_levels=4)
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(4, 0.25)))
    # A generic theta (not the Bayes-optimal one) so that W and V carry no special structure.
    theta = theta_0 + 0.05 * jax.random.normal(jax.random.PRNGKey(4), theta_0.shape)
    return problem, theta


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_affine_map_equals_loop_pathwise(setup, guidance):
    problem, theta = setup
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, problem.dim))
    c = problem.embeddings[:, 1]
    ddim = ddim_affine(problem, theta, guidance)
    # The loop is the same affine map computed step by step: float64 round-off only.
    assert_allclose_report(
        noise @ ddim.noise_map.T + ddim.prompt_map @ c,
        ddim_sample(problem, theta, noise, c, guidance),
        rtol=1e-10,
        atol=1e-12,
        name="x0",
    )


def test_generated_distribution_matches_monte_carlo_loop(setup):
    problem, theta = setup
    n = 40_000
    c = problem.embeddings[:, 2] + 0.3 * problem.embeddings[:, 0]
    samples = np.asarray(
        ddim_sample(
            problem, theta, jax.random.normal(jax.random.PRNGKey(1), (n, problem.dim)), c, 1.5
        )
    )
    mean, cov = (np.asarray(a) for a in generated_distribution(problem, theta, c, 1.5))
    # Sample mean: std sqrt(C_ii / n); sample covariance entry (i, j): std sqrt((C_ii C_jj + C_ij^2) / n)
    # for Gaussian data. 5 standard errors: a false failure has probability < 1e-6 per entry.
    diag = np.diag(cov)
    mean_tol = 5 * np.sqrt(diag / n)
    assert np.all(np.abs(samples.mean(0) - mean) <= mean_tol), (
        np.abs(samples.mean(0) - mean) / mean_tol
    )
    cov_tol = 5 * np.sqrt((np.outer(diag, diag) + cov**2) / n)
    emp = np.cov(samples, rowvar=False)
    assert np.all(np.abs(emp - cov) <= cov_tol), np.max(np.abs(emp - cov) / cov_tol)


def test_vmap_over_prompts_and_zero_guidance(setup):
    problem, theta = setup
    means, covs = jax.vmap(lambda c: generated_distribution(problem, theta, c))(
        problem.embeddings.T
    )
    for k in range(problem.num_concepts):
        mean_k, cov_k = generated_distribution(problem, theta, problem.embeddings[:, k])
        assert_allclose_report(means[k], mean_k, rtol=1e-12, atol=1e-14, name="mean")
        assert_allclose_report(covs[k], cov_k, rtol=1e-12, atol=1e-14, name="cov")
    # s = 0 is unconditional sampling: the mean no longer depends on the prompt (and is 0 here).
    mean0, _ = generated_distribution(problem, theta, problem.embeddings[:, 0], 0.0)
    assert float(jnp.max(jnp.abs(mean0))) == 0.0
