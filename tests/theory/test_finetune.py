"""Closed-form GD and the resurgence law against optax simulations, plus the law's properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import theory as T
from theory.testing import assert_allclose_report

D, M, K, L = 6, 5, 4, 3


def _setup(seed, *, p_null=0.0, v_only=True, ft_probs=(0.0, 1 / 3, 1 / 3, 1 / 3), scale=0.3):
    problem = T.make_problem(jax.random.PRNGKey(seed), dim=D, embed_dim=M, num_concepts=K, num_levels=L)
    theta0 = T.pretrain_closed_form(problem, T.concept_distribution(problem, jnp.ones(K) / K, p_null=p_null))
    noise = scale * jax.random.normal(jax.random.PRNGKey(seed + 100), theta0.shape)
    if v_only:
        noise = noise.at[..., :D].set(0.0)
    theta_u = theta0 + noise
    data = T.concept_distribution(problem, jnp.asarray(ft_probs), p_null=p_null)
    return problem, data, theta0, theta_u


@pytest.mark.parametrize("p_null", [0.0, 0.2])
def test_closed_form_gd_matches_optax_gd(p_null):
    problem, data, theta0, theta_u = _setup(0, p_null=p_null, v_only=False)
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    lr = 1.5 / float(setup.eigen.lambda_max)
    steps = jnp.arange(0, 201, 20)
    closed = T.gd_closed_form(setup, theta_u, lr, steps)
    sim = T.simulate_finetune(problem, data, theta_u, theta0, optax.sgd(lr), 200, record_every=20, keep_params=True)
    # float64 GD recursion over 200 steps: round-off accumulates to ~1e-13, far under 1e-8.
    assert_allclose_report(sim.params, closed, rtol=0, atol=1e-8, name="theta_T")
    predicted = T.predict_rho(*setup.law_inputs(), lr, steps)
    assert_allclose_report(sim.rho, predicted, rtol=0, atol=1e-8, name="rho")
    assert_allclose_report(T.rho(closed, theta_u, theta0), predicted, rtol=0, atol=1e-10, name="rho def")


def test_checked_entry_point_and_forget_loss_recovery():
    problem, data, theta0, theta_u = _setup(1)
    result = T.finetune_gd(problem, data, theta_u, theta0, 0.5 / 1.0, np.array([0, 5, 50]))
    forget = T.concept_distribution(problem, jnp.array([1.0, 0, 0, 0]))
    sim = T.simulate_finetune(problem, data, theta_u, theta0, optax.sgd(0.5), 50, record_every=5, forget=forget)
    fm = T.second_moments(problem, forget)
    losses = jnp.array([T.diffusion_loss(p, fm, problem.schedule) for p in result.params])
    np.testing.assert_allclose(sim.forget_loss[jnp.array([0, 1, 10])], losses, rtol=1e-10)
    lf0 = T.diffusion_loss(theta0, fm, problem.schedule)
    recovery = T.forget_loss_recovery(losses, losses[0], lf0)
    assert float(recovery[0]) == 0.0 and float(recovery[-1]) > 0.0


def test_adam_and_sgd_simulations_run_and_reduce_loss():
    problem, data, theta0, theta_u = _setup(2)
    adam = T.simulate_finetune(problem, data, theta_u, theta0, optax.adam(1e-2), 100, record_every=10)
    sgd = T.simulate_finetune(
        problem, data, theta_u, theta0, optax.sgd(0.2), 100, record_every=10, batch_size=256, key=jax.random.PRNGKey(0)
    )
    # The exact fine-tuning minimum: loss at theta0 (in-distribution, p_null = 0).
    floor = float(T.diffusion_loss(theta0, T.second_moments(problem, data), problem.schedule))
    for traj in (adam, sgd):
        assert float(traj.finetune_loss[-1]) < float(traj.finetune_loss[0])
        assert float(traj.finetune_loss[-1]) >= floor - 1e-12
    # Minibatch SGD follows full-batch GD in expectation: compare to the closed form at T=100,
    # sampling error of 256-sample gradients averaged over 100 steps is a few 1e-2 in rho.
    exact = T.predict_rho(*T.finetune_setup(problem, data, theta_u, theta0).law_inputs(), 0.2, jnp.array([100]))
    assert abs(float(sgd.rho[-1]) - float(exact[0])) < 0.05


def test_truncated_closure_is_exact_at_full_rank_and_first_step():
    problem, data, theta0, theta_u = _setup(3, ft_probs=(0.0, 0.5, 0.5, 0.0))
    # A shifted fine-tuning target: new concept means, so g is not H delta.
    shifted = T.new_concept_distribution(problem, data.embeddings, data.means + 0.5, data.probs)
    setup = T.finetune_setup(problem, shifted, theta_u, theta0)
    lam, g, dc = setup.law_inputs()
    order = jnp.argsort(-jnp.abs(lam))
    n = lam.shape[0]
    basis = jnp.eye(n)[:, order]  # eigenvectors in coordinate space
    lr, steps = 0.5 / float(setup.eigen.lambda_max), jnp.array([1, 10, 100, 1000])
    exact = T.predict_rho(lam, g, dc, lr, steps)

    def matvec(v):
        return lam * v

    errors = []
    for k in (0, n // 8, n // 2, n):
        inputs = T.truncated_closure_inputs(lam[order][:k], basis[:, :k], matvec, g, dc)
        inputs.pop("eigenvalues")
        rk = T.predict_rho_truncated(lam[order][:k], lr=lr, steps=steps, **inputs)
        # T = 1 is first order: every a_i = lr, so rho_k(1) = lr <g, delta>/||delta||^2 for any k.
        np.testing.assert_allclose(rk[0], exact[0], rtol=1e-10)
        errors.append(float(jnp.max(jnp.abs(rk - exact))))
    assert errors[-1] < 1e-12  # all eigenpairs: the remainder vanishes
    assert errors[-2] < errors[0]  # half the spectrum beats the one-direction closure


# --- properties of the law (theory.md section 4, consequences (a) and (b)) ------------------


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), lr_frac=st.floats(0.05, 1.9))
def test_delta_orthogonal_to_range_gives_zero_resurgence(seed, lr_frac):
    problem, data, theta0, _ = _setup(seed)
    # range(H) rows are span{[x; c]}: its orthogonal complement is [0; b] with b _|_ ft prompts.
    ft_emb = data.embeddings[:, data.probs > 0]
    q, _ = jnp.linalg.qr(jnp.concatenate([ft_emb, jax.random.normal(jax.random.PRNGKey(seed), (M, M))], 1))
    b = q[:, ft_emb.shape[1] :]  # orthonormal complement of the fine-tuning prompts
    coeffs = jax.random.normal(jax.random.PRNGKey(seed + 1), (L, D, b.shape[1]))
    delta = jnp.concatenate([jnp.zeros((L, D, D)), coeffs @ b.T], axis=-1)
    setup = T.finetune_setup(problem, data, theta0 + delta, theta0)
    lr = lr_frac / float(setup.eigen.lambda_max)
    steps = jnp.array([0, 1, 7, 100, 10_000])
    assert float(jnp.max(jnp.abs(T.predicted_rho_closed_form(setup, lr, steps)))) < 1e-12
    moved = T.gd_closed_form(setup, theta0 + delta, lr, steps)
    assert float(jnp.max(jnp.abs(T.rho(moved, theta0 + delta, theta0)))) < 1e-12


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), lr_frac=st.floats(0.05, 1.9))
def test_rho_tends_to_projection_on_range_of_hessian(seed, lr_frac):
    problem, data, theta0, theta_u = _setup(seed, v_only=False)
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    lam = setup.eigen.eigenvalues
    positive = lam > 1e-10 * float(jnp.max(lam))
    lr = lr_frac / float(jnp.max(lam))
    # Steps for the slowest positive mode to decay below 1e-12 (closed form handles any T).
    slowest = float(jnp.min(jnp.where(positive, jnp.minimum(lr * lam, 2 - lr * lam), jnp.inf)))
    steps = jnp.array([int(np.ceil(28 / slowest)) + 1])
    # Independent projection: P = S S^+ per level, applied to every row of delta.
    proj = jnp.einsum("lij,ljk->lik", setup.delta, setup.moments @ jnp.linalg.pinv(setup.moments, hermitian=True))
    expected = jnp.sum(proj**2) / jnp.sum(setup.delta**2)
    np.testing.assert_allclose(T.predicted_rho_closed_form(setup, lr, steps)[0], expected, rtol=1e-8, atol=1e-10)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), lr_frac=st.floats(0.01, 1.99), p_null=st.sampled_from([0.0]))
def test_in_distribution_gd_keeps_rho_bounded(seed, lr_frac, p_null):
    problem, data, theta0, theta_u = _setup(seed, p_null=p_null, v_only=False)
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    lr = lr_frac / float(setup.eigen.lambda_max)
    steps = jnp.array([0, 1, 2, 3, 10, 100, 1000])
    r = T.predicted_rho_closed_form(setup, lr, steps)
    # g = H delta, so rho(T) = sum_i (1 - (1 - lr lam_i)^T) w_i with w_i >= 0, sum w_i <= 1.
    # For lr <= 1/lam_max every factor is in [0, 1]: rho in [0, 1]. For 1/lam_max < lr < 2/lam_max
    # GD overshoots (1 - lr lam < 0) and a factor reaches up to 2 at odd T: rho in [0, 2).
    upper = 1.0 if lr_frac <= 1.0 else 2.0
    assert float(jnp.min(r)) >= -1e-12
    assert float(jnp.max(r)) <= upper + 1e-12


def test_gd_overshoot_takes_rho_above_one():
    # The counterexample to "rho in [0, 1] for every lr < 2/lambda_max": one mode, lr lam = 1.5.
    r = T.predict_rho(np.array([1.0]), np.array([1.0]), np.array([1.0]), 1.5, np.array([1, 2]))
    np.testing.assert_allclose(np.asarray(r), [1.5, 0.75])


def test_resurgence_is_invariant_to_rotations_of_the_embedding_space():
    # Rotating prompt space (C -> R C, A -> A R^T) maps V -> V R^T and leaves rho unchanged.
    problem, data, theta0, theta_u = _setup(7)
    rot, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(9), (M, M)))
    rotated = T.problem_from_arrays(problem.generator @ rot.T, problem.covariance, rot @ problem.embeddings, problem.schedule)
    rot_data = T.concept_distribution(rotated, data.probs)

    def rotate(theta):
        return T.join_params(theta[..., :D], theta[..., D:] @ rot.T)

    theta0_r = T.pretrain_closed_form(rotated, T.concept_distribution(rotated, jnp.ones(K) / K))
    assert_allclose_report(theta0_r, rotate(theta0), rtol=1e-9, atol=1e-11, name="theta_0 rotated")
    steps, lr = jnp.array([1, 10, 100]), 0.3
    base = T.predicted_rho_closed_form(T.finetune_setup(problem, data, theta_u, theta0), lr, steps)
    turned = T.predicted_rho_closed_form(T.finetune_setup(rotated, rot_data, rotate(theta_u), theta0_r), lr, steps)
    assert_allclose_report(turned, base, rtol=1e-9, atol=1e-12, name="rho")
