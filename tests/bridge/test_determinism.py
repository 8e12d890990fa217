"""The determinism check: a tolerance per dtype that passes round-off and fails real randomness.

For each of float64, float32, bfloat16 and float16 on the tiny UNet (batches of 2 samples):
- the deterministic operator passes, with rtol = max(8 eps, 4 x measured floor) <= 64 eps;
- a benign non-determinism (samples summed in a random order on every call: the same loss, other
  rounding) passes: that is the round-off the tolerance must absorb;
- re-drawn noise on every call and train-mode dropout fail, with a message that names the
  quantity, the size of the difference, the causes and the fixes.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from bridge._determinism import EPS_MULTIPLE, FLOOR_MULTIPLE, rtol_for
from bridge.curvature import HessianOperator, NonDeterministicError
from bridge.loss import FrozenDiffusionLoss
from tests.bridge.conftest import build_case

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def _case(dtype, **unet):
    return {
        "seed": 0,
        "unet": {"sample_size": 8, **unet},
        "group": r"down_blocks\.0\..*attn2\.to_k\.",
        "dtype": dtype,
        "batches": 1,
        "batch_size": 2,
    }


def _op(loss, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the attention fallback's notice
        return HessianOperator(loss, **kwargs)


class ResampledNoiseLoss(FrozenDiffusionLoss):
    """The bug under test: fresh noise on every call instead of the frozen draw."""

    def batch_loss(self, flat, index):
        b = self.batches[index]
        noise = torch.randn_like(b.target)
        out = torch.func.functional_call(
            self.unet,
            self.group.unflatten(flat),
            (b.noisy + noise, b.timesteps),
            {"encoder_hidden_states": b.cond},
        ).sample
        return ((out - noise) ** 2).mean()


class ShuffledLoss(FrozenDiffusionLoss):
    """Benign: the samples of a batch in a random order on every call (same loss, other rounding)."""

    def batch_loss(self, flat, index):
        b = self.batches[index]
        p = torch.randperm(b.noisy.shape[0])
        out = torch.func.functional_call(
            self.unet,
            self.group.unflatten(flat),
            (b.noisy[p], b.timesteps[p]),
            {"encoder_hidden_states": b.cond[p]},
        ).sample
        err = out - b.target[p]
        return (err * err).mean()


FIXES = [
    "noise or timesteps re-drawn on every call -> draw them once with "
    "bridge.loss.make_probe_batches(seed=...)",
    "the UNet in train mode, so dropout is active -> call unet.eval()",
    "non-deterministic attention or convolution kernels -> "
    "torch.use_deterministic_algorithms(True)",
]


def _assert_teaches(message: str):
    assert re.search(
        r"(diffusion loss|Hessian-vector product) differs between two evaluations "
        r"at the same theta: max \|difference\| = \d\.\d{3}e[-+]\d+, relative ",
        message,
    )
    assert "> rtol" in message
    for fix in FIXES:
        assert fix in message


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_deterministic_operator_passes_with_a_tolerance_that_can_fail(dtype):
    _, _, loss = build_case(_case(dtype))
    report = _op(loss).determinism
    eps = float(torch.finfo(dtype).eps)
    assert report.hvp_difference == 0.0 and report.loss_difference == 0.0  # CPU: bitwise
    assert report.floor_kind == "linearity defect" and report.noise_floor > 0
    assert report.hvp_rtol == max(EPS_MULTIPLE * eps, FLOOR_MULTIPLE * report.noise_floor)
    # The floor is round-off (measured 0.5-17 eps, so 4 x floor <= 70 eps; 256 eps leaves 3.6x),
    # and the tolerance stays below 0.1, under the >= 13 % of max|Hv| by which re-drawn noise or
    # dropout move the product (bridge/_determinism.py): the check can fail in every dtype.
    assert report.hvp_rtol <= min(256 * eps, 0.1)
    assert report.loss_rtol == rtol_for(dtype) == EPS_MULTIPLE * eps


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_benign_reordering_passes(dtype):
    unet, _, loss = build_case(_case(dtype))
    shuffled = ShuffledLoss(unet, loss.group, loss.batches)
    torch.manual_seed(0)
    report = _op(shuffled).determinism
    assert report.hvp_difference <= report.hvp_rtol


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_redrawn_noise_fails(dtype):
    unet, _, loss = build_case(_case(dtype))
    torch.manual_seed(0)
    with pytest.raises(NonDeterministicError) as info:
        _op(ResampledNoiseLoss(unet, loss.group, loss.batches))
    _assert_teaches(str(info.value))


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=IDS[1:])
@pytest.mark.parametrize("method", ["graph-reuse", "double-backward"])
def test_train_mode_dropout_fails(dtype, method):
    unet, _, loss = build_case(_case(dtype, dropout=0.1))
    _op(loss, method=method)  # eval mode (FrozenDiffusionLoss sets it): deterministic
    unet.train()
    torch.manual_seed(0)
    with pytest.raises(NonDeterministicError) as info:
        _op(loss, method=method)
    _assert_teaches(str(info.value))
    assert "Seen here: the UNet IS in train mode now" in str(info.value)
    unet.eval()


def test_finite_difference_floor():
    _, _, loss = build_case(_case(torch.float32))
    report = _op(loss, method="finite-difference").determinism
    assert report.floor_kind == "finite-difference round-off"
    assert report.hvp_difference == 0.0 and report.hvp_rtol == rtol_for(
        torch.float32, report.noise_floor
    )


class NoiseUnderGradLoss(ResampledNoiseLoss):
    """Re-draws noise only where autograd records (the products), not for the loss value."""

    def batch_loss(self, flat, index):
        if torch.is_grad_enabled():
            return super().batch_loss(flat, index)
        return FrozenDiffusionLoss.batch_loss(self, flat, index)


def test_product_failure_names_the_tolerance_and_its_derivation():
    unet, _, loss = build_case(_case(torch.float32))
    torch.manual_seed(0)
    with pytest.raises(NonDeterministicError) as info:
        _op(NoiseUnderGradLoss(unet, loss.group, loss.batches))
    message = str(info.value)
    assert message.startswith("Hessian-vector product differs")
    assert re.search(
        r"> rtol \d\.\d\de-\d\d \(max\(8 eps, 4 x measured linearity defect "
        r"\d\.\d\de-\d\d\), torch\.float32\)",
        message,
    )
    _assert_teaches(message)
