"""graph-reuse HVPs (one retained first-order graph per probe batch) against independent products.

Truths: the dense Hessian of the session case (itself checked against
``torch.autograd.functional.hessian`` in test_curvature.py), double backward (a fresh graph per
product), and central differences of gradients.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from bridge.curvature import HessianOperator
from bridge.spectra import dense_hessian
from tests.bridge.conftest import build_case
from theory.testing import assert_allclose_report as allclose_report

EPS64 = float(torch.finfo(torch.float64).eps)
#: Three probe batches of one sample each: one retained graph per batch.
MULTI = {
    "seed": 0,
    "unet": {"sample_size": 8},
    "group": r"down_blocks\.0\..*attn2\.to_k\.",
    "dtype": torch.float64,
    "batches": 3,
    "batch_size": 1,
}


def _op(loss, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention fallback's one-time warning
        return HessianOperator(loss, **kwargs)


def _columns(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def multi():
    _, _, loss = build_case(MULTI)
    return loss


def test_graph_reuse_equals_double_backward_and_dense(case):
    loss = case["loss"]
    reuse, fresh = _op(loss), _op(loss, method="double-backward")
    assert reuse.method == "graph-reuse"  # the default
    cols = _columns(loss.numel, 4, 11)
    a, b = reuse @ cols, fresh @ cols
    assert reuse.graph_batches == 1 and reuse.graph_bytes > 0 and fresh.graph_bytes == 0
    # Same kernels in the same order on the same frozen batch: a reordering bound of 8 eps
    # (bridge/_determinism.py) is the most they may differ (they agree bitwise on CPU).
    allclose_report(
        a.numpy(),
        b.numpy(),
        rtol=0,
        atol=8 * EPS64 * float(b.abs().max()),
        name="graph-reuse vs double backward",
    )
    expected = case["dense"] @ cols.numpy()
    # float64 round-off of the dense truth (see test_dense_hessian_matches_autograd_hessian).
    allclose_report(
        a.numpy(),
        expected,
        rtol=0,
        atol=1e-10 * np.abs(expected).max(),
        name="graph-reuse vs dense",
    )


def test_another_quadrature_is_another_operator(case):
    # The equality above is not vacuous: the same UNet at other timesteps is far away.
    from dataclasses import replace

    from bridge.loss import FrozenDiffusionLoss

    loss = case["loss"]
    moved = [replace(b, timesteps=(b.timesteps + 250) % 1000) for b in loss.batches]
    op = _op(FrozenDiffusionLoss(case["unet"], loss.group, moved))
    v = _columns(loss.numel, 1, 12)[:, 0]
    hv, ref = (op @ v).numpy(), case["dense"] @ v.numpy()
    assert np.abs(hv - ref).max() > 1e-3 * np.abs(ref).max()


def test_one_graph_per_batch(multi):
    reuse, fresh = _op(multi), _op(multi, method="double-backward")
    cols = _columns(multi.numel, 3, 13)
    a, b = reuse @ cols, fresh @ cols
    assert reuse.graph_batches == 3
    allclose_report(
        a.numpy(),
        b.numpy(),
        rtol=0,
        atol=8 * EPS64 * float(b.abs().max()),
        name="3 retained graphs vs double backward",
    )
    dense = dense_hessian(fresh)
    allclose_report(
        a.numpy(),
        dense @ cols.numpy(),
        rtol=0,
        atol=1e-10 * np.abs(dense @ cols.numpy()).max(),
        name="vs dense",
    )
    # Independent of both: central differences of gradients (truncation ~1e-10, eps/h ~2e-11).
    theta, h, v = multi.theta(), 1e-5, cols[:, 0]
    fd = (multi.gradient(theta + h * v) - multi.gradient(theta - h * v)) / (2 * h)
    allclose_report(
        a[:, 0].numpy(), fd.numpy(), rtol=0, atol=1e-7 * float(fd.abs().max()), name="vs central FD"
    )
    # Memory: the three batches have the same shapes, so each retained graph holds the same
    # bytes; one batch's operator holds a third.
    single = _op(multi, batch_indices=[0])
    single @ v
    assert reuse.graph_bytes == 3 * single.graph_bytes > 0
    # The gradient is read off the retained graphs: loss.gradient() through the same (math SDPA)
    # attention kernel, so again at most a reordering apart (8 eps).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        grad = multi.gradient()
    allclose_report(
        reuse.gradient().numpy(),
        grad.numpy(),
        rtol=0,
        atol=8 * EPS64 * float(grad.abs().max()),
        name="gradient",
    )


def test_memory_limit_keeps_what_fits(multi):
    one = _op(multi, batch_indices=[0])
    one @ _columns(multi.numel, 1, 1)[:, 0]
    limit = 1.5 * one.graph_bytes
    with pytest.warns(
        UserWarning,
        match=re.escape("graph-reuse: the first-order graphs of 1 of 3 probe batches are retained"),
    ):
        op = HessianOperator(multi, graph_memory_limit=limit)
    assert op.graph_batches == 1 and op.graph_bytes <= limit
    cols = _columns(multi.numel, 2, 14)
    ref = _op(multi, method="double-backward") @ cols
    allclose_report(
        (op @ cols).numpy(),
        ref.numpy(),
        rtol=0,
        atol=8 * EPS64 * float(ref.abs().max()),
        name="partly retained",
    )


def test_stale_graph_is_refused_and_release_rebuilds():
    unet, _, loss = build_case({**MULTI, "batches": 1})  # own UNet: its weights get touched
    op = _op(loss)
    v = _columns(loss.numel, 1, 15)[:, 0]
    before = op @ v
    with torch.no_grad():
        unet.conv_out.weight.mul_(1.5)  # a weight the retained backward graph saved
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "graph-reuse: the UNet's weights changed in place after this operator built its "
            "first-order graphs; call op.release_graph()"
        ),
    ):
        op @ v
    op.release_graph()
    assert op.graph_bytes == 0 and op.graph_batches == 0
    after = op @ v
    ref = _op(loss, method="double-backward") @ v
    allclose_report(
        after.numpy(),
        ref.numpy(),
        rtol=0,
        atol=8 * EPS64 * float(ref.abs().max()),
        name="rebuilt at the new weights",
    )
    assert float((after - before).abs().max()) > 1e-3 * float(before.abs().max())
