"""The Adam prediction (preconditioned law) against optax simulations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import theory as T
from theory.preconditioned import adam_preconditioner, dense_hessian, predicted_rho_preconditioned
from theory.testing import assert_allclose_report


def _problem():
    problem = T.make_problem(jax.random.PRNGKey(11), dim=5, embed_dim=5, num_concepts=4, num_levels=3)
    theta0 = T.pretrain_closed_form(problem, T.concept_distribution(problem, jnp.ones(4) / 4))
    theta_u = T.unlearn(problem, theta0, "uce", forget=[0], retain=[])
    data = T.concept_distribution(problem, jnp.array([0.0, 1 / 3, 1 / 3, 1 / 3]))
    return problem, data, theta0, theta_u


def test_dense_hessian_matches_block_matvec():
    problem, data, theta0, theta_u = _problem()
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    v = jax.random.normal(jax.random.PRNGKey(0), theta_u.shape)
    expected = T.hessian_matvec(v, setup.moments, problem.schedule).reshape(-1)
    assert_allclose_report(dense_hessian(setup, problem.schedule) @ v.reshape(-1), expected, rtol=1e-12, atol=1e-13)


def test_preconditioned_law_matches_preconditioned_gd_simulation():
    problem, data, theta0, theta_u = _problem()
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    precond = adam_preconditioner(setup.grad, eps=1e-3)
    lr = 1e-3
    steps = jnp.array([0, 1, 10, 50, 100])
    predicted = predicted_rho_preconditioned(setup, problem.schedule, precond, lr, steps)
    # Independent: optax SGD on the gradient divided by the fixed preconditioner.
    def precondition(updates, state, params=None):
        return updates / precond, state

    opt = optax.chain(optax.GradientTransformation(lambda p: optax.EmptyState(), precondition), optax.sgd(lr))
    sim = T.simulate_finetune(problem, data, theta_u, theta0, opt, 100, record_every=1)
    assert_allclose_report(sim.rho[steps], predicted, rtol=0, atol=1e-9, name="preconditioned rho")


def test_identity_preconditioner_reduces_to_the_plain_law():
    problem, data, theta0, theta_u = _problem()
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    steps = jnp.array([1, 10, 100])
    plain = T.predicted_rho_closed_form(setup, 0.5, steps)
    same = predicted_rho_preconditioned(setup, problem.schedule, jnp.ones_like(setup.grad), 0.5, steps)
    assert_allclose_report(same, plain, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_less(0.0, np.asarray(plain)[-1])


def test_first_adam_step_equals_the_prediction_and_instability_is_refused():
    problem, data, theta0, theta_u = _problem()
    setup = T.finetune_setup(problem, data, theta_u, theta0)
    eps, lr = 1e-2, 1e-4  # an eps large enough that fixed-P GD is stable on this problem
    adam = T.simulate_finetune(problem, data, theta_u, theta0, optax.adam(lr, eps=eps), 1)
    # Adam's first update is lr * g / (|g| + eps): the preconditioned step with P = |g| + eps.
    precond = adam_preconditioner(setup.grad, eps)
    scale = 1.0 / jnp.sqrt(precond.reshape(-1))
    lam_max = float(jnp.linalg.eigvalsh(scale[:, None] * dense_hessian(setup, problem.schedule) * scale)[-1])
    assert lr * lam_max < 2
    predicted = predicted_rho_preconditioned(setup, problem.schedule, precond, lr, jnp.array([1]))
    np.testing.assert_allclose(adam.rho[1], predicted[0], rtol=1e-8)
    big_lr = 4.0 / lam_max
    with pytest.raises(ValueError, match="preconditioned GD is unstable"):
        predicted_rho_preconditioned(setup, problem.schedule, precond, big_lr, jnp.array([1]))
