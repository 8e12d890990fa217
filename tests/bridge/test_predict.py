"""Predicted readouts against the dense Hessian's eigendecomposition (float64 tiny UNet).

The group (K/V of one cross-attention block, 256 parameters) is small enough for the dense
Hessian, so the exact GD prediction on the local quadratic model is
Delta R(T) = -sum_i a_i(T) <g, v_i> <v_i, grad R> over all n eigenpairs (theory.law). The
Krylov and quadrature predictors must equal it to round-off (T <= m and T <= 2m), the closure
predictor must converge to it as k grows, and no predictor may compute a Hessian-vector product.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from bridge.curvature import HessianOperator
from bridge.local_curvature import LocalCurvature, measure_local_curvature
from bridge.predict import check_same_seeds, predict_displacement, predict_readouts
from bridge.spectra import dense_hessian
from tests.bridge.readout_case import build_readout_case

EPS = float(np.finfo(np.float64).eps)
STEPS = [1, 4, 10, 16]


@pytest.fixture(scope="module")
def setup():
    import jax

    from theory.law import predict_readout_change

    built = build_readout_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(built["finetune_loss"])
        dense = dense_hessian(op)
    dense = 0.5 * (dense + dense.T)
    lam, vecs = np.linalg.eigh(dense)
    grads = built["readouts"].gradients()
    g = op.gradient().double().numpy()
    lrs = [0.5 / lam.max(), 1.0 / lam.max()]
    with jax.enable_x64(True):
        exact = np.stack(
            [
                np.stack(
                    [
                        np.asarray(predict_readout_change(lam, vecs.T @ g, vecs.T @ u, lr, STEPS))
                        for lr in lrs
                    ]
                )
                for u in grads.gradients
            ]
        )
    return {**built, "op": op, "dense": dense, "lam": lam, "vecs": vecs, "grads": grads,
            "g": g, "lrs": lrs, "exact": exact}


def _round_off_tolerance(s, m):
    """Relative tolerance of an exact Krylov prediction in float64.

    Lanczos with full reorthogonalisation has backward error ~ m n eps ||H|| (m steps, n-term
    dot products); a(H, T) amplifies a perturbation of H by at most T max|1 - lr lambda|^(T-1)
    relative to a(H, T) itself (lr lambda_max <= 1, and the negative eigenvalues grow). With the
    measured spectrum this is the bound below, x10 for the quadrature's polarisation cancellation.
    """
    growth = max(1.0, float(np.max(np.abs(1 - max(s["lrs"]) * s["lam"]))))
    t = max(STEPS)
    return 10 * m * len(s["lam"]) * EPS * t * growth ** (t - 1)


def test_krylov_and_quadrature_equal_the_dense_eigendecomposition(setup):
    s = setup
    grads, op = s["grads"], s["op"]
    depth = max(STEPS)
    curv = measure_local_curvature(
        op,
        krylov_depth=depth,
        quadrature={n: grads.gradient(n) for n in grads.names},
        quadrature_depth=depth // 2,
    )
    assert curv.hvps["krylov"] == depth
    assert all(curv.hvps[f"quadrature[{n}]"] == depth for n in grads.names)  # 2 runs of m/2
    before = op.num_matvecs
    krylov = predict_readouts(curv, grads, lrs=s["lrs"], steps=STEPS, predictor="krylov")
    quad = predict_readouts(curv, grads, lrs=s["lrs"], steps=STEPS, predictor="quadrature")
    predict_displacement(curv, lr=s["lrs"][0], steps=STEPS)
    assert op.num_matvecs == before  # prediction is pure: every lr and T, no HVP
    scale = np.abs(s["exact"]).max(axis=(1, 2), keepdims=True)
    tol = _round_off_tolerance(s, depth)
    assert tol < 1e-6  # a real check: measured errors are ~1e-14
    for pred in (krylov, quad):
        err = np.abs(pred.change - s["exact"]) / scale
        assert err.max() <= tol, (pred.predictor, err.max(), tol)
    # Shallower runs are not exact: the depth matters. Measured relative errors at m = 2, 4, 8:
    # 1.2, 4e-2, 4e-7 (and 7e-15 at m = 12: this spectrum is resolved early).
    errs = {}
    for m in (2, 8):
        short = measure_local_curvature(op, krylov_depth=m)
        loose = predict_readouts(short, grads, lrs=s["lrs"], steps=STEPS, exact=False)
        errs[m] = float((np.abs(loose.change - s["exact"]) / scale).max())
    assert errs[2] > 0.1 and errs[8] > 1e3 * tol, errs


def _closure_curvature(s, k):
    """LocalCurvature from the dense eigenpairs: the k largest and k most-negative, + closure."""
    lam, vecs, g = s["lam"], s["vecs"], s["g"]
    idx = np.r_[np.arange(len(lam) - 1, len(lam) - 1 - k, -1), np.arange(k - 1, -1, -1)]
    v = vecs[:, idx]
    g_perp = g - v @ (v.T @ g)
    lam_perp = float(g_perp @ s["dense"] @ g_perp / (g_perp @ g_perp))
    return LocalCurvature(g, s["group"].spec, len(g), lam[idx], v, True, lam_perp)


def test_closure_converges_to_the_exact_prediction_as_k_grows(setup):
    s = setup
    scale = np.abs(s["exact"]).max(axis=(1, 2), keepdims=True)
    errors = []
    for k in (1, 4, 16, 64, 127):  # eigenpairs per end; n = 256
        pred = predict_readouts(
            _closure_curvature(s, k), s["grads"], lrs=s["lrs"], steps=STEPS, predictor="closure"
        )
        errors.append(float((np.abs(pred.change - s["exact"]) / scale).max()))
    # Exact once the basis is complete; with 2k = 254 of 256 eigenpairs only a 2-dim remainder
    # is lumped into g_perp. Measured worst relative errors at k = 1, 4, 16, 64, 127 per end:
    # 0.72, 0.35, 1.6e-3, 1.7e-7, 1.4e-12.
    assert all(b <= a * 1.01 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4 * errors[0], errors


def test_bad_prediction_inputs_are_one_line(setup):
    s = setup
    grads = s["grads"]
    curv = measure_local_curvature(
        s["op"], krylov_depth=4, quadrature={"rho": grads.gradient("rho")}, quadrature_depth=4
    )
    message = (
        "`krylov_depth` = 4 Lanczos steps is exact only up to T = 4 (the displacement, T <= m) "
        "but the largest T is 16: use krylov_depth >= 16, or exact=False."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        predict_readouts(curv, grads, lrs=[0.1], steps=STEPS)
    only_rho = type(grads)(("rho",), grads.values[:1], grads.gradients[:1], grads.group_spec)
    message = (
        "`quadrature_depth` = 4 Lanczos steps is exact only up to T = 8 (Gauss quadrature, "
        "T <= 2m) but the largest T is 16: use quadrature_depth >= 8, or exact=False."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        predict_readouts(curv, only_rho, lrs=[0.1], steps=STEPS, predictor="quadrature")
    with pytest.raises(ValueError, match=re.escape("`predictor` must be one of")):
        predict_readouts(curv, grads, lrs=[0.1], steps=STEPS, predictor="newton")
    with pytest.raises(ValueError, match=re.escape("`seeds` differ between prediction")):
        check_same_seeds((1, 2, 3), (1, 2, 4))
    check_same_seeds((1, 2), [1, 2])


def test_ggn_is_the_linearised_hessian(setup):
    """G = J^T (2/|y|) J against a dense Jacobian, and G = H where the residuals vanish."""
    import torch

    from bridge.ggn import GGNOperator

    s = setup
    loss = s["finetune_loss"]
    theta_u = loss.theta()
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(loss.numel, 3, generator=gen, dtype=torch.float64)
    dense = torch.zeros(loss.numel, loss.numel, dtype=torch.float64)
    for b in range(len(loss.batches)):
        op = GGNOperator(loss, theta_u)
        jac = torch.autograd.functional.jacobian(lambda th, b=b, op=op: op._output(th, b), theta_u)
        jac = jac.reshape(-1, loss.numel)
        dense += 2.0 * jac.T @ jac / jac.shape[0] / len(loss.batches)
    got = GGNOperator(loss, theta_u) @ v
    # Same float64 products in another order: ~n eps relative (n = 256) x10.
    torch.testing.assert_close(got, dense @ v, rtol=1e-12, atol=1e-12 * float(dense.abs().max()))
    # The in-distribution targets are theta_0's own outputs, so at theta_0 every residual is 0
    # and the Hessian is exactly the GGN (up to the HVP's round-off, ~1e-13 relative here).
    theta_0 = s["readouts"].theta_0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hess = HessianOperator(loss, theta_0) @ v
    ggn = GGNOperator(loss, theta_0) @ v
    torch.testing.assert_close(ggn, hess, rtol=1e-9, atol=1e-9 * float(hess.abs().max()))
    # ... and not at theta_u, where the residuals are not zero (the comparison has teeth).
    h_u = torch.as_tensor(s["dense"]) @ v
    assert float((got - h_u).abs().max()) > 1e-3 * float(h_u.abs().max())
