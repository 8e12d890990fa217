"""Closed-form moments, loss and Kronecker Hessian against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import theory as T
from theory.testing import assert_allclose_report


@pytest.fixture(scope="module")
def problem():
    return T.make_problem(jax.random.PRNGKey(3), dim=5, embed_dim=6, num_concepts=3, num_levels=4)


def test_second_moments_match_monte_carlo(problem):
    data = T.concept_distribution(problem, jnp.array([0.5, 0.3, 0.2]), p_null=0.25)
    n = 400_000
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    idx = jax.random.choice(k[0], 3, (n,), p=data.probs)
    keep = jax.random.uniform(k[1], (n,)) >= data.p_null
    c = jnp.where(keep[:, None], data.embeddings.T[idx], 0.0)
    x0 = data.means.T[idx] + jax.random.normal(k[2], (n, problem.dim)) @ jnp.linalg.cholesky(problem.covariance).T
    eps = jax.random.normal(k[3], (n, problem.dim))
    closed = T.second_moments(problem, data)
    for level in range(problem.schedule.num_levels):
        a, s = problem.schedule.alphas[level], problem.schedule.sigmas[level]
        z = jnp.concatenate([a * x0 + s * eps, c], axis=1)
        mc = z.T @ z / n
        # Entries are O(1) second moments of unit-scale Gaussians: MC std ~ sqrt(2/n) ~ 2e-3;
        # 5 sigma plus the 4th-moment spread of the largest entries gives atol 1.5e-2.
        assert_allclose_report(mc, closed[level], rtol=0, atol=1.5e-2, name=f"S_{level}")


def test_loss_is_the_expected_squared_error(problem):
    data = T.concept_distribution(problem, jnp.ones(3) / 3, p_null=0.1)
    theta = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 5, 11))
    moments = T.second_moments(problem, data)
    # Independent: E||W x_t + V c - eps||^2 = tr(theta S theta^T) - 2 tr(theta E[z eps^T]) + d,
    # with E[z eps^T] computed from the definition x_t = a x0 + s eps (eps independent of x0, c).
    total = 0.0
    for t in range(4):
        s = problem.schedule.sigmas[t]
        cross = np.zeros((11, 5))
        cross[:5] = s * np.eye(5)
        th = np.asarray(theta[t])
        total += problem.schedule.weights[t] * (
            np.trace(th @ np.asarray(moments[t]) @ th.T) - 2 * np.trace(th @ cross) + 5
        )
    np.testing.assert_allclose(T.diffusion_loss(theta, moments, problem.schedule), total, rtol=1e-12)


def test_kronecker_hessian_matches_jax_hessian(problem):
    data = T.concept_distribution(problem, jnp.array([0.2, 0.3, 0.5]), p_null=0.1)
    moments = T.second_moments(problem, data)
    shape = (4, 5, 11)

    def flat_loss(v):
        return T.diffusion_loss(v.reshape(shape), moments, problem.schedule)

    dense = jax.hessian(flat_loss)(jnp.zeros(int(np.prod(shape))))
    eigen = T.hessian_eigen(moments, problem.schedule)
    blocks = 2 * problem.schedule.weights[:, None, None] * moments
    kron = jax.scipy.linalg.block_diag(*[jnp.kron(jnp.eye(5), b) for b in blocks])
    assert_allclose_report(dense, kron, rtol=1e-12, atol=1e-12, name="Hessian")
    # Eigenvalues: the block spectrum, each value repeated d = 5 times.
    expected = np.sort(np.repeat(np.asarray(eigen.eigenvalues).reshape(-1), 5))
    assert_allclose_report(np.linalg.eigvalsh(np.asarray(dense)), expected, rtol=1e-10, atol=1e-12, name="eig")
    # Matvec and gradient agree with autodiff.
    direction = jax.random.normal(jax.random.PRNGKey(2), shape)
    hv = (dense @ direction.reshape(-1)).reshape(shape)
    assert_allclose_report(T.hessian_matvec(direction, moments, problem.schedule), hv, rtol=1e-12, atol=1e-12)
    grad = jax.grad(flat_loss)(direction.reshape(-1)).reshape(shape)
    assert_allclose_report(T.diffusion_grad(direction, moments, problem.schedule), grad, rtol=1e-12, atol=1e-12)
    # Coordinates round-trip through the eigenbasis.
    coords = T.eigen_coordinates(direction, eigen)
    assert_allclose_report(T.from_eigen_coordinates(coords, eigen), direction, rtol=1e-12, atol=1e-12)


def test_pretrained_equals_bayes_optimal(problem):
    data = T.concept_distribution(problem, jnp.array([0.2, 0.3, 0.5]))
    theta0 = T.pretrain_closed_form(problem, data)
    bayes = T.bayes_optimal_denoiser(problem)
    w0, v0 = T.split_params(theta0, 5)
    wb, vb = T.split_params(bayes, 5)
    assert_allclose_report(w0, wb, rtol=1e-10, atol=1e-12, name="W")
    # V is identified only on span(C) (the prompts); compare V c_k for every concept.
    assert_allclose_report(v0 @ problem.embeddings, vb @ problem.embeddings, rtol=1e-10, atol=1e-12, name="VC")
    # Zero gradient at theta_0 for every in-distribution prompt mixture.
    for probs in ([1.0, 0, 0], [0, 0.5, 0.5]):
        other = T.concept_distribution(problem, jnp.array(probs))
        g = T.diffusion_grad(theta0, T.second_moments(problem, other), problem.schedule)
        assert float(jnp.abs(g).max()) < 1e-11


def test_pretrained_full_rank_embeddings_equal_bayes_everywhere():
    # K > m: the prompts span R^m, so V itself (not only V C) is identified.
    key = jax.random.PRNGKey(4)
    base = T.make_problem(key, dim=4, embed_dim=3, num_concepts=2, num_levels=3)
    emb = jax.random.normal(jax.random.PRNGKey(5), (3, 5))
    problem = T.problem_from_arrays(base.generator, base.covariance, emb, base.schedule)
    theta0 = T.pretrain_closed_form(problem, T.concept_distribution(problem, jnp.ones(5) / 5))
    assert_allclose_report(theta0, T.bayes_optimal_denoiser(problem), rtol=1e-9, atol=1e-11)


def test_pretraining_by_steps_converges_to_closed_form(problem):
    import optax

    data = T.concept_distribution(problem, jnp.array([0.2, 0.3, 0.5]), p_null=0.2)
    closed = T.pretrain_closed_form(problem, data, ridge=1e-3)
    moments = T.second_moments(problem, data)
    eigen = T.hessian_eigen(moments, problem.schedule)
    # Ridge minimiser differs from the plain one; compare GD on the plain loss started at the
    # ridge point: GD can only lower the loss and must stay within the flat directions' offset.
    trained = T.pretrain_by_steps(problem, data, optax.sgd(1.0 / float(eigen.lambda_max)), 3000, init=closed)
    plain = T.pretrain_closed_form(problem, data)
    loss = lambda th: float(T.diffusion_loss(th, moments, problem.schedule))  # noqa: E731
    assert loss(trained) <= loss(closed) + 1e-12
    assert loss(trained) - loss(plain) < 1e-6
