"""Hessian operator against independent computations: dense autograd Hessian, finite differences."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from bridge.curvature import HessianOperator
from bridge.spectra import curvature_along, hutchpp_trace, spectrum_ends, top_eigenpairs
from theory.testing import assert_allclose_report as allclose_report


def test_dense_hessian_matches_autograd_hessian(case):
    # Independent truth: torch.autograd.functional.hessian of the same loss (math SDPA kernel,
    # since the default attention kernel has no second derivative).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss, theta = case["loss"], case["loss"].theta()
    with sdpa_kernel(SDPBackend.MATH):
        truth = torch.autograd.functional.hessian(lambda x: loss.batch_loss(x, 0), theta)
    # float64 round-off of a ~1e5-flop reduction: 1e-10 relative to the largest entry.
    allclose_report(
        case["dense"],
        truth.numpy(),
        rtol=0,
        atol=1e-10 * np.abs(truth.numpy()).max(),
        name="dense Hessian vs autograd.functional.hessian",
    )
    allclose_report(
        case["dense"],
        case["dense"].T,
        rtol=0,
        atol=1e-12 * np.abs(case["dense"]).max(),
        name="symmetry",
    )


@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse", "finite-difference"])
def test_other_hvp_methods_match_dense(case, method):
    loss = case["loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(loss, method=method, check_deterministic=False)
    v = torch.randn(loss.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = case["dense"] @ v.numpy()
    # double backward / forward-over-reverse are exact (float64 round-off); the central difference
    # has O(h^2) truncation with h = eps^(1/3) ~ 6e-6 relative, plus eps/h ~ 4e-11 round-off: 1e-6
    # of the norm covers both.
    tol = 1e-6 if method == "finite-difference" else 1e-10
    allclose_report(
        (op @ v).numpy(),
        expected,
        rtol=0,
        atol=tol * np.abs(expected).max(),
        name=f"{method} HVP vs dense",
    )


def test_hvp_matches_central_difference_of_gradients(case):
    loss, theta = case["loss"], case["loss"].theta()
    v = torch.randn(loss.numel, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 1e-5
    fd = (loss.gradient(theta + h * v) - loss.gradient(theta - h * v)) / (2 * h)
    hv = case["op"] @ v
    # truncation O(h^2 |d^3L|) ~ 1e-10 relative here, round-off eps/h ~ 2e-11: 1e-7 is safe.
    allclose_report(
        hv.numpy(), fd.numpy(), rtol=0, atol=1e-7 * fd.abs().max().item(), name="HVP vs central FD"
    )


@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lanczos_top_k_matches_eigh(case, which, method):
    k = 4
    result = top_eigenpairs(case["op"], k, which=which, tol=0, method=method)
    w, vecs = np.linalg.eigh(case["dense"])
    expected = w[::-1][:k] if which == "LA" else w[:k][::-1]
    scale = np.abs(w).max()
    allclose_report(
        result.eigenvalues, expected, rtol=0, atol=1e-9 * scale, name=f"{method} {which}"
    )
    # Eigenvectors up to sign: |<v_lanczos, v_eigh>| = 1.
    idx = [np.argmin(np.abs(w - lam)) for lam in result.eigenvalues]
    overlaps = np.abs(np.sum(result.eigenvectors * vecs[:, idx], axis=0))
    allclose_report(overlaps, np.ones(k), rtol=0, atol=1e-6, name="eigenvector overlaps")
    assert result.num_matvecs > 0


@pytest.mark.parametrize("method", ["lanczos", "eigsh"])
def test_spectrum_ends_is_indefinite_and_complete_at_both_ends(case, method):
    result = spectrum_ends(case["op"], 3, tol=0, method=method)
    w = np.linalg.eigvalsh(case["dense"])
    expected = np.concatenate([w[::-1][:3], w[:3][::-1]])
    allclose_report(result.eigenvalues, expected, rtol=0, atol=1e-9 * np.abs(w).max(), name="ends")
    assert result.eigenvalues.min() < 0 < result.eigenvalues.max()  # random init: indefinite


def test_curvature_along_and_trace(case):
    d = torch.randn(
        case["loss"].numel, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    expected = d.numpy() @ case["dense"] @ d.numpy() / float(d @ d)
    assert curvature_along(case["op"], d) == pytest.approx(expected, rel=1e-9)
    # Hutch++ with m products: the m/3-column sketch removes (about) the top m/3 eigen-directions,
    # Hutchinson with m/3 Rademacher probes on the rest has std <= sqrt(2 / (m/3)) ||tail||_F.
    m = 120
    w = np.linalg.eigvalsh(case["dense"])
    tail = np.sort(np.abs(w))[: len(w) - m // 3]
    bound = 4 * np.sqrt(2 / (m // 3)) * np.linalg.norm(tail)  # 4 sigma
    est = hutchpp_trace(case["op"], m)
    assert abs(est - np.trace(case["dense"])) < bound
    assert est == hutchpp_trace(case["op"], m)  # seeded: reproducible


def test_fallback_engages_when_default_attention_has_no_second_derivative(case):
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bridge.loss import FrozenDiffusionLoss
    from bridge.tiny import build_tiny_unet

    # The default (fused SDPA) kernel on this machine has no double-backward rule:
    unet = case["unet"]
    unet.set_attn_processor(AttnProcessor2_0())
    loss = FrozenDiffusionLoss(unet, case["loss"].group, case["loss"].batches)
    theta = loss.theta().clone().requires_grad_(True)
    with (
        sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        pytest.raises((RuntimeError, NotImplementedError)),
    ):
        (g,) = torch.autograd.grad(loss.batch_loss(theta, 0), theta, create_graph=True)
        torch.autograd.grad(g.sum(), theta)
    with pytest.warns(UserWarning, match="switching to sdpa-math"):
        op = HessianOperator(loss, check_deterministic=False)
        v = torch.randn(  # not all-ones: CLIP's final LayerNorm puts 1 in the K null space
            loss.numel, generator=torch.Generator().manual_seed(8), dtype=torch.float64
        )
        hv = op @ v
    assert op.attention_fallback == "sdpa-math"
    expected = case["dense"] @ v.numpy()
    allclose_report(
        hv.numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max(), name="HVP after fallback"
    )
    del build_tiny_unet


def test_bad_k_and_nonfinite(case):
    n = case["loss"].numel
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"`k`={n} eigenpairs requested but the parameter group has n={n} parameters"
        ),
    ):
        top_eigenpairs(case["op"], n)
    with pytest.raises(ValueError, match="both ends would overlap"):
        spectrum_ends(case["op"], n // 2)
    with pytest.raises(
        ValueError, match=re.escape("`method` must be one of ('lanczos', 'eigsh'), got 'power'")
    ):
        spectrum_ends(case["op"], 2, method="power")
    with pytest.raises(ValueError, match=re.escape("`method` must be one of ('graph-reuse', ")):
        HessianOperator(case["loss"], method="jvp")
    with pytest.raises(ValueError, match="zero vector"):
        curvature_along(case["op"], torch.zeros(n, dtype=torch.float64))
    bad = torch.full((n,), float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite Hessian-vector product"):
        case["op"] @ bad
    with pytest.raises(FloatingPointError, match="non-finite diffusion loss"):
        HessianOperator(case["loss"], theta=bad)


def test_spectral_density_first_moment(case):
    from bridge.spectra import spectral_density

    w = np.linalg.eigvalsh(case["dense"])
    pad = 0.2 * (w.max() - w.min())
    grid, density = spectral_density(
        case["op"], lanczos_steps=20, num_probes=2, boundaries=(w.min() - pad, w.max() + pad)
    )
    assert (density >= 0).all()
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)  # Gaussian tails cut: 1e-3
    # Gauss quadrature reproduces each probe's Rayleigh quotient exactly, so the mean eigenvalue
    # has the Hutchinson error of 2 probes: std ~ std(w) sqrt(2 / (n + 2) / 2) (Gaussian probes).
    mean = np.trapezoid(grid * density, grid)
    sigma = w.std() * np.sqrt(1.0 / (len(w) + 2))
    assert abs(mean - w.mean()) < 4 * sigma


def test_second_fallback_classic_processor(case, monkeypatch):
    # Simulate a platform where even the math SDPA kernel cannot be differentiated twice (here:
    # the fallback context keeps the fused CPU kernel), so the classic processor must engage.
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bridge.loss import FrozenDiffusionLoss

    unet = case["unet"]
    unet.set_attn_processor(AttnProcessor2_0())
    monkeypatch.setattr(
        HessianOperator, "_attention_context", lambda self: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    )
    loss = FrozenDiffusionLoss(unet, case["loss"].group, case["loss"].batches)
    try:
        with pytest.warns(UserWarning, match="switching to classic-processor"):
            op = HessianOperator(loss, check_deterministic=False)
            v = torch.randn(  # not all-ones: CLIP's final LayerNorm puts 1 in the K null space
                loss.numel, generator=torch.Generator().manual_seed(8), dtype=torch.float64
            )
            hv = op @ v
        assert op.attention_fallback == "classic-processor"
        expected = case["dense"] @ v.numpy()
        allclose_report(
            hv.numpy(),
            expected,
            rtol=0,
            atol=1e-10 * np.abs(expected).max(),
            name="HVP with the classic attention processor",
        )
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
