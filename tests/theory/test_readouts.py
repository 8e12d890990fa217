"""The law for any readout (theory.md s.4b) against exact evaluation and GD simulation, and its
Krylov form against the eigendecomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from theory import (
    concept_distribution,
    finetune_setup,
    gd_closed_form,
    make_problem,
    pretrain_closed_form,
    simulate_finetune,
)
from theory.krylov import krylov_displacement, krylov_readout_change, lanczos
from theory.law import (
    predict_readout_change,
    predict_readout_change_truncated,
    readout_closure_inputs,
    truncated_closure_inputs,
)
from theory.quadratic import eigen_coordinates, hessian_matvec
from theory.readouts import READOUT_NAMES, readouts
from theory.unlearning import unlearn

K = 5
STEPS = np.array([0, 1, 5, 20, 60])


@pytest.fixture(scope="module")
def case():
    problem = make_problem(jax.random.PRNGKey(2), dim=6, embed_dim=7, num_concepts=K, num_levels=3)
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(K, 1.0 / K)))
    theta_u = unlearn(problem, theta_0, "esd_x", 0)
    ft = concept_distribution(problem, np.array([0, 0.5, 0.3, 0.2, 0]))
    setup = finetune_setup(problem, ft, theta_u, theta_0)
    lr = 0.8 / float(setup.eigen.lambda_max)
    return problem, theta_0, theta_u, ft, setup, lr, readouts(problem, theta_0, theta_u, 0)


def _law(setup, grad_r, lr, steps):
    lam, g, _ = setup.law_inputs()
    r = eigen_coordinates(grad_r, setup.eigen).reshape(-1)
    return np.asarray(predict_readout_change(lam, g, r, lr, steps))


def test_readouts_are_zero_at_theta_u_and_one_at_theta_0(case):
    _, theta_0, theta_u, *_, ro = case
    for name in READOUT_NAMES:
        assert abs(float(ro.value[name](theta_u))) < 1e-12, name
        assert float(ro.value[name](theta_0)) == pytest.approx(1.0, abs=1e-12), name


def test_readout_gradients_match_autodiff(case):
    """Closed-form gradients (rho, output_rho, forget loss) against jax.grad of the exact value."""
    _, _, theta_u, *_, ro = case
    for name in READOUT_NAMES:
        auto = jax.grad(ro.value[name])(theta_u)
        np.testing.assert_allclose(ro.gradient[name], auto, rtol=1e-10, atol=1e-12, err_msg=name)


def test_law_is_exact_for_linear_readouts_and_matches_gd_simulation(case):
    """rho and output_rho are linear in theta: the law equals the closed-form GD value, and both
    equal an optax GD simulation to 1e-8 (float64; the simulation accumulates 60 roundings)."""
    problem, theta_0, theta_u, ft, setup, lr, ro = case
    exact = gd_closed_form(setup, theta_u, lr, STEPS)
    traj = simulate_finetune(
        problem, ft, theta_u, theta_0, optax.sgd(lr), 60, record_every=1, keep_params=True
    )
    recorded = np.asarray(traj.params)[STEPS]
    for name in ("rho", "output_rho"):
        law = _law(setup, ro.gradient[name], lr, STEPS)
        at_exact = np.array([float(ro.value[name](t)) for t in exact])
        simulated = np.array([float(ro.value[name](t)) for t in recorded])
        np.testing.assert_allclose(law, at_exact, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(simulated, at_exact, atol=1e-8, err_msg=name)
    for name in ("forget_loss_recovery", "sample_shift"):  # nonlinear: exact value vs simulation
        at_exact = np.array([float(ro.value[name](t)) for t in exact])
        simulated = np.array([float(ro.value[name](t)) for t in recorded])
        np.testing.assert_allclose(simulated, at_exact, atol=1e-8, err_msg=name)


def test_first_order_error_of_nonlinear_readouts_is_second_order(case):
    """Halving lr quarters the first-order law's error (forget loss: a quadratic; sample shift:
    a polynomial through the sampler), so the law is the right first-order object."""
    _, _, theta_u, _, setup, lr, ro = case
    for name in ("forget_loss_recovery", "sample_shift"):
        errors = []
        for scale in (1e-2, 5e-3):
            law = _law(setup, ro.gradient[name], lr * scale, np.array([3]))[0]
            exact = float(ro.value[name](gd_closed_form(setup, theta_u, lr * scale, [3])[0]))
            errors.append(abs(law - exact))
        assert errors[1] / errors[0] == pytest.approx(0.25, abs=0.03), (name, errors)


def _flat_matvec(problem, setup):
    shape = setup.grad.shape
    return lambda v: np.asarray(
        hessian_matvec(jnp.asarray(v).reshape(shape), setup.moments, problem.schedule)
    ).reshape(-1)


def test_krylov_is_exact_for_t_up_to_twice_its_depth(case):
    """m Lanczos steps per polarisation run: exact (1e-9 relative) for every T <= 2m, any lr."""
    problem, _, _, _, setup, lr, ro = case
    mv = _flat_matvec(problem, setup)
    g = np.asarray(setup.grad).reshape(-1)
    lrs = np.array([0.3 * lr, lr])
    for name in READOUT_NAMES:
        u = np.asarray(ro.gradient[name]).reshape(-1)
        got, used = krylov_readout_change(mv, g, u, lrs, STEPS)  # depth ceil(60 / 2) = 30
        assert used == 2 * 30
        for i, eta in enumerate(lrs):
            want = _law(setup, ro.gradient[name], eta, STEPS)
            np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match=r"`num_steps` = 10 Lanczos steps give the quadratic form"):
        krylov_readout_change(mv, g, u, lr, STEPS, num_steps=10)


def test_krylov_displacement_is_exact_for_t_up_to_its_depth(case):
    problem, _, theta_u, _, setup, lr, _ = case
    run = lanczos(_flat_matvec(problem, setup), np.asarray(setup.grad).reshape(-1), 60)
    moved = krylov_displacement(run, lr, STEPS)
    exact = np.asarray(gd_closed_form(setup, theta_u, lr, STEPS) - theta_u).reshape(len(STEPS), -1)
    np.testing.assert_allclose(moved, exact, atol=1e-10 * np.abs(exact).max())


def test_truncated_and_krylov_predictions_converge(case):
    """Error of the top-k + closure prediction and of a depth-m Krylov quadrature (exact=False)
    against the exact law, at T = 60: both reach round-off at full size and shrink before."""
    problem, _, _, _, setup, lr, ro = case
    mv = _flat_matvec(problem, setup)
    lam, g_coords, _ = setup.law_inputs()
    order = np.argsort(-np.asarray(lam))
    n = lam.shape[0]
    basis = np.eye(n)  # eigen coordinates: v_i are unit vectors there
    steps = np.array([60])
    for name in ("output_rho", "rho"):
        r = np.asarray(eigen_coordinates(ro.gradient[name], setup.eigen).reshape(-1))
        want = float(np.asarray(predict_readout_change(lam, g_coords, r, lr, steps))[0])
        errs = []
        for k in (1, n // 4, n // 2, n):
            idx = order[:k]
            inputs = truncated_closure_inputs(
                np.asarray(lam)[idx],
                basis[:, idx],
                lambda v: np.asarray(lam) * v,
                np.asarray(g_coords),
                r,
            )
            extra = readout_closure_inputs(basis[:, idx], np.asarray(g_coords), r)
            got = predict_readout_change_truncated(
                inputs["eigenvalues"], inputs["grad_coords"], extra["readout_coords"], lr, steps,
                grad_perp_dot_readout=extra["grad_perp_dot_readout"], lambda_perp=inputs["lambda_perp"],
            )
            errs.append(abs(float(got[0]) - want))
        assert errs[-1] <= 1e-10 * abs(want) + 1e-14, (name, errs)
        g_flat = np.asarray(setup.grad).reshape(-1)
        u_flat = np.asarray(ro.gradient[name]).reshape(-1)
        krylov = [
            abs(float(krylov_readout_change(mv, g_flat, u_flat, lr, steps, num_steps=m, exact=False)[0][0]) - want)
            for m in (2, 8, 30)
        ]
        assert krylov[-1] <= 1e-9 * abs(want), (name, krylov)
        assert krylov[0] > krylov[-1], (name, krylov)
