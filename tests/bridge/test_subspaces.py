"""Subspaces and the law's prediction against independent computations."""

from __future__ import annotations

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


def test_predicted_rho_matches_small_step_gd_on_tiny_unet(case):
    # Resurgence of actual full-batch GD on the frozen loss vs the theory's truncated law. With
    # lr * |lambda| * T ~ 1e-2, GD stays in the local quadratic region: the law's error is the
    # third-order Taylor remainder, O(lr^2 T^2 |g| |d^3 L|), a relative ~1e-3 here.
    loss, op = case["loss"], case["op"]
    theta_u = loss.theta()
    delta = torch.from_numpy(np.random.default_rng(2).standard_normal(loss.numel)) * 0.05
    w = np.linalg.eigvalsh(case["dense"])
    lr, steps = 0.5 / np.abs(w).max() * 0.02, [1, 3, 6]
    grad = loss.gradient(theta_u)
    top = np.linalg.eigh(case["dense"])
    k = 8
    idx = np.argsort(np.abs(top[0]))[::-1][:k]
    pred = predicted_rho(
        top[0][idx],
        top[1][:, idx],
        lambda v: (op @ torch.from_numpy(v)).numpy(),
        grad,
        delta,
        lr=lr,
        steps=steps,
    )
    theta, measured = theta_u.clone(), []
    for t in range(1, max(steps) + 1):
        theta = theta - lr * loss.gradient(theta)
        if t in steps:
            measured.append(measured_rho(theta, theta_u, delta))
    measured = np.array(measured)
    assert np.all(np.abs(measured) > 0)
    allclose_report(pred.predicted_rho, measured, rtol=2e-3, name="predicted vs GD rho")
    # The first step is exact to first order: rho(1) = lr <g, delta>/||delta||^2.
    first = lr * float(grad @ delta) / float(delta @ delta)
    assert pred.predicted_rho[0] == pytest.approx(first, rel=1e-10)
    assert pred.negative_share.shape == (3,)


def test_negative_directions_flagged_when_they_dominate():
    lam = np.array([1.0, -1.0])
    vecs = np.eye(2)
    grad, delta = np.array([0.1, 1.0]), np.array([1.0, 1.0])
    hmv = lambda v: lam * v  # noqa: E731
    pred = predicted_rho(lam, vecs, hmv, grad, delta, lr=0.1, steps=[1, 20])
    assert pred.negative_dominated.all()  # the -1 direction carries 10x the gradient overlap
    # Closed form: a(lam, T) g d / |d|^2 summed.
    a = lambda l, t: (1 - (1 - 0.1 * l) ** t) / l  # noqa: E731, E741
    expected = [(a(1.0, t) * 0.1 + a(-1.0, t) * 1.0) / 2 for t in (1, 20)]
    allclose_report(pred.predicted_rho, expected, rtol=1e-12, name="rho closed form")


def test_forget_loss_recovery_and_error():
    assert forget_loss_recovery(2.0, 1.5, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recovery undefined"):
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
