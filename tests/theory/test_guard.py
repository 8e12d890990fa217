"""Guarded GD (theory/guard.py): closed form against a direct projected-GD run, and the guard's
promise: readouts inside the guard do not move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import (
    concept_distribution,
    finetune_setup,
    gd_closed_form,
    make_problem,
    pretrain_closed_form,
)
from theory.guard import (
    dense_hessian,
    forget_output_guard,
    guarded_gd,
    readout_guard,
    retain_core_guard,
)
from theory.presence import presence
from theory.quadratic import diffusion_grad
from theory.readouts import readouts
from theory.unlearning import unlearn
from theory.unlearning.targets import prompt_moments

K = 4
STEPS = np.array([0, 1, 7, 40])


@pytest.fixture(scope="module")
def case():
    problem = make_problem(jax.random.PRNGKey(5), dim=5, embed_dim=6, num_concepts=K, num_levels=3)
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(K, 1.0 / K)))
    theta_u = unlearn(problem, theta_0, "uce", 0)
    ft = concept_distribution(problem, np.array([0.0, 0.2, 0.3, 0.5]))
    setup = finetune_setup(problem, ft, theta_u, theta_0)
    lr = 0.9 / float(setup.eigen.lambda_max)
    return problem, theta_0, theta_u, setup, lr


def _projected_gd(problem, setup, theta_u, guard, lr, steps):
    """Direct iteration theta <- theta - lr P grad (the definition), in NumPy."""
    p = np.eye(guard.shape[0]) - np.asarray(guard) @ np.asarray(guard).T
    theta, out = np.asarray(theta_u), {}
    for k in range(max(steps) + 1):
        if k in steps:
            out[k] = theta.copy()
        g = np.asarray(diffusion_grad(jnp.asarray(theta), setup.moments, problem.schedule))
        theta = theta - lr * (p @ g.ravel()).reshape(theta.shape)
    return np.stack([out[k] for k in steps])


def test_unguarded_is_plain_gd_and_guarded_matches_projected_gd(case):
    problem, theta_0, theta_u, setup, lr = case
    empty = jnp.zeros((theta_u.size, 0))
    plain = guarded_gd(problem, setup.moments, theta_u, empty, lr, STEPS)
    np.testing.assert_allclose(plain.params, gd_closed_form(setup, theta_u, lr, STEPS), atol=1e-12)
    assert float(plain.removed_fraction) == 0.0
    guard = forget_output_guard(problem, 0)
    guarded = guarded_gd(problem, setup.moments, theta_u, guard, lr, STEPS)
    # 40 steps of float64 round-off in the direct run: 1e-10 is ~1e5 eps of margin.
    np.testing.assert_allclose(
        guarded.params, _projected_gd(problem, setup, theta_u, guard, lr, STEPS), atol=1e-10
    )
    assert 0.0 < float(guarded.removed_fraction) <= 1.0


def test_forget_output_guard_keeps_the_erased_prompt_exactly(case):
    """Outputs on the erased prompt's data do not move, so output_rho, the sample shift and
    presence after guarded fine-tuning equal their values at theta_u; plain GD moves them."""
    problem, theta_0, theta_u, setup, lr = case
    ro = readouts(problem, theta_0, theta_u, 0)
    guard = forget_output_guard(problem, 0)
    guarded = guarded_gd(problem, setup.moments, theta_u, guard, lr, STEPS).params
    plain = gd_closed_form(setup, theta_u, lr, STEPS)
    emb = problem.embeddings[:, 0]
    p_u = float(presence(problem, theta_u, emb, 0))
    for name in ("output_rho", "sample_shift"):
        assert max(abs(float(ro.value[name](t))) for t in guarded) < 1e-10, name
        assert abs(float(ro.value[name](plain[-1]))) > 1e-3, name
    assert max(abs(float(presence(problem, t, emb, 0)) - p_u) for t in guarded) < 1e-10
    s_f, _ = prompt_moments(problem, emb, problem.concept_means[:, 0])
    assert float(jnp.max(jnp.abs((guarded[-1] - theta_u) @ s_f))) < 1e-10


def test_readout_guard_zeroes_the_guarded_readouts_at_every_step(case):
    problem, theta_0, theta_u, setup, lr = case
    ro = readouts(problem, theta_0, theta_u, 0)
    guard = readout_guard([ro.gradient["rho"], ro.gradient["output_rho"]])
    assert guard.shape[1] == 2
    result = guarded_gd(problem, setup.moments, theta_u, guard, lr, STEPS)
    for name in ("rho", "output_rho"):  # linear readouts: exactly zero, not only to first order
        assert max(abs(float(ro.value[name](t))) for t in result.params) < 1e-10, name
    plain = guarded_gd(problem, setup.moments, theta_u, jnp.zeros((theta_u.size, 0)), lr, STEPS)
    # A rank-2 guard removes little of the benign fine-tuning: it keeps over half of its decrease.
    gap_plain = float(plain.finetune_loss[0] - plain.finetune_loss[-1])
    gap_guarded = float(result.finetune_loss[0] - result.finetune_loss[-1])
    assert gap_guarded > 0.5 * gap_plain


def test_retain_core_guard_at_full_energy_freezes_the_retained_outputs(case):
    problem, theta_0, theta_u, setup, lr = case
    guard = retain_core_guard(problem, (1, 2), energy=1.0)
    result = guarded_gd(problem, setup.moments, theta_u, guard, lr, STEPS)
    for p in (1, 2):
        s_p, _ = prompt_moments(problem, problem.embeddings[:, p], problem.concept_means[:, p])
        assert float(jnp.max(jnp.abs((result.params[-1] - theta_u) @ s_p))) < 1e-10


def test_dense_hessian_is_the_loss_hessian(case):
    problem, _, theta_u, setup, _ = case
    h = dense_hessian(setup.moments, problem.schedule.weights, problem.dim)
    auto = jax.hessian(
        lambda x: __import__("theory").diffusion_loss(
            x.reshape(theta_u.shape), setup.moments, problem.schedule
        )
    )(jnp.ravel(theta_u))
    np.testing.assert_allclose(h, auto, atol=1e-10)


def test_row_form_equals_the_dense_guard(case):
    """guarded_gd_rows (per-level (n, n) algebra) against guarded_gd on the dense (N, N) guard."""
    from theory.guard import _row_guard, forget_output_bases, guarded_gd_rows, retain_core_bases

    problem, _, theta_u, setup, lr = case
    n = theta_u.shape[-1]
    for bases in (
        forget_output_bases(problem, 0),
        retain_core_bases(problem, (1, 2)),
        jnp.zeros((theta_u.shape[0], n, n)),
    ):
        rows = guarded_gd_rows(problem, setup.moments, theta_u, bases, lr, STEPS)
        dense = guarded_gd(problem, setup.moments, theta_u, _row_guard(bases, problem.dim), lr, STEPS)
        np.testing.assert_allclose(rows.params, dense.params, rtol=0, atol=1e-10)
        np.testing.assert_allclose(rows.finetune_loss, dense.finetune_loss, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rows.removed_fraction, dense.removed_fraction, atol=1e-12)
