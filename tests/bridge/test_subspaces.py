"""Subspaces and the law's prediction against independent computations."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.subspaces import (
    forget_loss_recovery,
    layerwise_forget_subspace,
    measured_rho,
    predicted_rho,
    principal_angles,
    spectral_weights,
)
from theory.testing import assert_allclose_report as allclose_report


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4))
def test_principal_angles_match_scipy(seed, p, q):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((12, p)), rng.standard_normal((12, q))
    b[:, 0] = a[:, 0] + 1e-3 * b[:, 0]  # one nearly shared direction
    ours = principal_angles(torch.from_numpy(a), b)
    # arccos of singular values near 1 loses half the digits: ~sqrt(eps) absolute.
    allclose_report(
        np.sort(ours),
        np.sort(scipy.linalg.subspace_angles(a, b)),
        rtol=0,
        atol=2e-8,
        name="principal angles",
    )


def test_layerwise_subspace_reconstructs_low_rank_delta(case):
    group = case["loss"].group
    rng = np.random.default_rng(0)
    blocks = []
    for shape in group.shapes:  # a rank-1 edit per layer, as UCE makes for one erased concept
        blocks.append(
            np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])).ravel()
        )
    delta = torch.from_numpy(np.concatenate(blocks))
    basis = layerwise_forget_subspace(delta, group, rank=2)
    assert basis.shape[1] == len(group.names)  # the second singular value is cut (rank 1)
    allclose_report(
        (basis.T @ basis).numpy(), np.eye(basis.shape[1]), rtol=0, atol=1e-12, name="orthonormal"
    )
    proj = basis @ (basis.T @ delta)
    allclose_report(proj.numpy(), delta.numpy(), rtol=0, atol=1e-12, name="delta in span")
    with pytest.raises(ValueError, match="delta is zero over group"):
        layerwise_forget_subspace(torch.zeros_like(delta), group)


def test_spectral_weights_sum_to_one_on_complete_basis(case):
    w, v = np.linalg.eigh(case["dense"])
    delta = np.random.default_rng(1).standard_normal(len(w))
    weights = spectral_weights(v, delta)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    expected = (v.T @ delta) ** 2 / (delta @ delta)
    allclose_report(weights, expected, rtol=1e-12, name="spectral weights")


def _dense_quadratic(eigenvalues, seed):
    """Hessian Q diag(eigenvalues) Q^T of a quadratic, dense (Q a random rotation), and Q."""
    n = len(eigenvalues)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    hessian = (rotation * eigenvalues) @ rotation.T
    return 0.5 * (hessian + hessian.T), rotation


def _amplification(lam, lr, steps):
    """a(lambda, T) = (1 - (1 - lr lambda)^T) / lambda in NumPy, independent of theory.law."""
    t = np.asarray(steps, dtype=np.float64)[:, None]
    return (1.0 - (1.0 - lr * np.asarray(lam)) ** t) / np.asarray(lam)


def _gd_rho(hessian, grad, delta, lr, steps):
    """rho(T) of actual GD on the quadratic L(theta_u + x) = <g, x> + x^T H x / 2."""
    x, out, theta_u = np.zeros(len(grad)), {}, torch.zeros(len(grad), dtype=torch.float64)
    for t in range(1, max(steps) + 1):
        x = x - lr * (grad + hessian @ x)
        out[t] = measured_rho(torch.from_numpy(x), theta_u, torch.from_numpy(delta))
    return np.array([out[t] for t in steps])


def test_law_with_a_complete_eigenbasis_is_gd_on_a_dense_quadratic():
    # An indefinite spectrum like the UNets' (a few negative directions), 64 parameters, and
    # steps where lr * lambda_max * T = 1, 4, 10: a(lambda, T) then differs strongly between
    # eigenvalues, so pairing g and delta with the wrong vectors changes the sum.
    lam = np.concatenate([np.linspace(1.0, 0.05, 48), np.linspace(-0.02, -0.3, 16)])
    hessian, _ = _dense_quadratic(lam, seed=0)
    rng = np.random.default_rng(1)
    grad, delta = rng.standard_normal(64), rng.standard_normal(64)
    w, v = np.linalg.eigh(hessian)
    lr, steps = 0.5 / w.max(), [2, 8, 20]
    assert [round(lr * w.max() * t, 12) for t in steps] == [1.0, 4.0, 10.0]
    measured = _gd_rho(hessian, grad, delta, lr, steps)

    def law(vectors):
        return predicted_rho(w, vectors, lambda x: hessian @ x, grad, delta, lr=lr, steps=steps)

    # Tolerance: both sides are exact on a quadratic, so only float64 round-off differs: eigh's
    # backward error ~ n eps = 64 * 2.2e-16 = 1.4e-14 per coordinate, T = 20 GD steps of O(n eps)
    # each, amplified at most by max|1 - lr lambda|^T = 1.15^20 = 16: 20 * 1.4e-14 * 16 = 4.5e-12.
    # 1e-10 is 20x that bound (measured: 1.2e-15).
    tol = 1e-10
    allclose_report(law(v).predicted_rho, measured, rtol=tol, name="law vs GD, complete basis")
    # Random orthonormal bases in place of the eigenvectors (same eigenvalues, still complete,
    # so the closure term vanishes) pair each a(lambda_i, T) with the wrong <g, v_i><v_i, delta>.
    # Measured over these seeds: worst relative error over T between 0.097 and 2.6, i.e. 9 to
    # 10 orders of magnitude above `tol`; 1e-3 keeps 7 orders of margin below that.
    for seed in range(5):
        rotation, _ = np.linalg.qr(np.random.default_rng(100 + seed).standard_normal((64, 64)))
        error = np.abs(law(rotation).predicted_rho - measured) / np.abs(measured)
        assert error.max() > 1e7 * tol, (seed, error)
    # T = 1 is exact for any basis: one GD step moves by -lr g (1e-12: 64-term dot products).
    one = predicted_rho(w, v, lambda x: hessian @ x, grad, delta, lr=lr, steps=[1])
    assert one.predicted_rho[0] == pytest.approx(lr * grad @ delta / (delta @ delta), rel=1e-12)


#: (eigen-terms c_i(T=20) to build, share of the absolute total from negative curvature).
NEGATIVE_SHARE_CASES = {
    # Negative-curvature terms cancel each other (+3.0, -3.2): their sum, -0.1, is smaller than
    # the positive terms' 0.6, but they are 6.3 of the 6.9 absolute total, 91 %: flagged.
    "negative-terms-cancel": ([0.3, 0.2, 0.1, 3.0, -3.2, 0.1], 6.3 / 6.9),
    "positive-dominated": ([2.0, 1.0, 0.5, 0.3, -0.2, 0.1], 0.6 / 4.1),
}


@pytest.mark.parametrize("name", list(NEGATIVE_SHARE_CASES))
def test_negative_share_is_term_by_term_on_a_dense_quadratic(name):
    wanted, share = NEGATIVE_SHARE_CASES[name]
    lam, lr, steps = np.array([2.0, 1.0, 0.5, -0.2, -0.4, -0.8]), 0.1, [0, 1, 20]
    hessian, rotation = _dense_quadratic(lam, seed=3)
    # delta = 1 in every eigen-coordinate (||delta||^2 = 6): g_i = c_i * 6 / a_i(20).
    grad_coords = np.asarray(wanted) * 6 / _amplification(lam, lr, [20])[0]
    grad, delta = rotation @ grad_coords, rotation @ np.ones(6)
    w, v = np.linalg.eigh(hessian)
    pred = predicted_rho(w, v, lambda x: hessian @ x, grad, delta, lr=lr, steps=steps)
    # Independent terms in eigh's basis. Tolerance 1e-12: both sides multiply the same float64
    # inputs in another order (JAX vs NumPy), a relative round-off of ~(T + n) eps = 6e-15 per
    # term, times at most 40 for coordinates smaller than their vector's norm: 2.4e-13
    # (measured 1.3e-15). T = 0 terms are exactly 0 on both sides.
    expected = _amplification(w, lr, steps) * (v.T @ grad) * (v.T @ delta) / (delta @ delta)
    allclose_report(pred.contributions[:, :6], expected, rtol=1e-12, name="terms")
    # A complete basis leaves g_perp at round-off, ||g_perp|| <= n eps ||g||, so the closure term
    # is at most a_max(T) n eps ||g|| / ||delta|| (measured: 2.6e-15, 10x under this bound).
    bound = _amplification(w, lr, steps).max() * 6 * np.finfo(float).eps * np.linalg.norm(grad)
    assert np.abs(pred.contributions[:, 6]).max() < bound / np.linalg.norm(delta)
    allclose_report(pred.contributions.sum(axis=1), pred.predicted_rho, rtol=1e-12, name="sum")
    # The law's value is the designed sum; its terms cancel up to 13x, so 1e-12 (measured 1e-14).
    assert pred.predicted_rho[2] == pytest.approx(sum(wanted), rel=1e-12)
    size = np.abs(expected)
    independent = size[:, w < 0].sum(axis=1) / np.where(size.sum(axis=1) > 0, size.sum(axis=1), 1)
    allclose_report(pred.negative_share, independent, rtol=1e-12, name="negative share")
    assert pred.negative_share[2] == pytest.approx(share, rel=1e-12)
    assert pred.negative_share[0] == 0.0 and not pred.negative_dominated[0]  # T = 0: no terms
    np.testing.assert_array_equal(pred.negative_dominated, pred.negative_share > 0.5)
    assert pred.negative_dominated[2] == (share > 0.5)
    if name == "negative-terms-cancel":  # the rule this replaces (sum per class) said "no"
        neg, pos = expected[2, w < 0].sum(), expected[2, w >= 0].sum()
        assert abs(neg) < abs(pos) and share > 0.9


def test_closure_term_is_classified_by_its_rayleigh_quotient():
    # Top-1 and bottom-1 eigenpairs measured; the six middle directions form g_perp, whose
    # Rayleigh quotient is negative because g weighs the negative middle eigenvalues most.
    lam = np.array([2.0, 0.3, 0.1, -0.1, -0.3, -0.5, -0.6, -0.7])
    hessian, rotation = _dense_quadratic(lam, seed=3)
    grad = rotation @ np.array([1.0, 0.1, 0.1, 0.3, 0.5, 0.8, 0.8, 0.05])
    delta = rotation @ np.ones(8)
    w, v = np.linalg.eigh(hessian)
    ends = [7, 0]  # largest, most negative
    pred = predicted_rho(
        w[ends], v[:, ends], lambda x: hessian @ x, grad, delta, lr=0.1, steps=[20]
    )
    g_perp = grad - v[:, ends] @ (v[:, ends].T @ grad)
    lam_perp = g_perp @ hessian @ g_perp / (g_perp @ g_perp)
    # 1e-12 for the same reason as in the test above (measured 1.3e-15).
    assert lam_perp < 0 and pred.curvatures[-1] == pytest.approx(lam_perp, rel=1e-12)
    curv = np.append(w[ends], lam_perp)
    coef = np.append((v[:, ends].T @ grad) * (v[:, ends].T @ delta), g_perp @ delta)
    terms = _amplification(curv, 0.1, [20])[0] * coef / (delta @ delta)
    allclose_report(pred.contributions[0], terms, rtol=1e-12, name="terms with closure")
    share = np.abs(terms[curv < 0]).sum() / np.abs(terms).sum()
    assert pred.negative_share[0] == pytest.approx(share, rel=1e-12)  # as above (measured 1e-15)
    # The closure decides the flag: counted as negative, 95 %; were it counted as positive
    # curvature, the share would be 2 %.
    assert share > 0.9 and pred.negative_dominated[0]
    assert abs(terms[1]) / np.abs(terms).sum() < 0.05


def test_forget_loss_recovery_and_error():
    assert forget_loss_recovery(2.0, 1.5, 1.0) == pytest.approx(0.5)
    message = "`forget_loss_recovery` is undefined: the forget loss is 1.0 at both theta_u"
    with pytest.raises(ValueError, match=re.escape(message)):
        forget_loss_recovery(1.0, 0.5, 1.0)


def test_gradient_subspaces_span_the_batch_gradients(case):
    from bridge.subspaces import finetune_gradient_subspace, gradient_forget_subspace

    loss = case["loss"]
    theta = loss.theta()
    g = loss.gradient(theta).numpy()
    for fn in (gradient_forget_subspace, finetune_gradient_subspace):
        basis = fn(loss, theta, rank=3).numpy()  # one batch: rank is capped at 1
        assert basis.shape == (loss.numel, 1)
        assert abs(basis[:, 0] @ g) == pytest.approx(np.linalg.norm(g), rel=1e-12)
