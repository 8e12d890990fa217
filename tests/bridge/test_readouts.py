"""Readout gradients at theta_u against central finite differences (float64 tiny UNet)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bridge.readouts import READOUT_NAMES, ReadoutSet
from tests.bridge.readout_case import build_readout_case

EPS = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def built():
    return build_readout_case()


def _central(readouts, direction, h, center):
    plus = readouts.values(center + h * direction)
    minus = readouts.values(center - h * direction)
    return {k: (plus[k] - minus[k]) / (2 * h) for k in plus}, {
        k: 1.0 + max(abs(plus[k]), abs(minus[k])) for k in plus
    }


@pytest.mark.parametrize("where", ["theta_u", "away"])
def test_every_readout_gradient_matches_central_differences(built, where):
    """At theta_u (``gradients``) and at a point between theta_u and theta_0 (``gradients_at``,
    what the guard evaluates along a run: the same readouts, still defined at theta_u)."""
    readouts = built["readouts"]
    center = readouts.theta_u
    if where == "away":
        center = readouts.theta_u - 0.3 * readouts.delta
        grads = readouts.gradients_at(center)
        values = readouts.values(center)
        assert [values[n] for n in grads.names] == pytest.approx(list(grads.values), abs=1e-13)
        assert abs(values["rho"] - 0.3) < 1e-12 and values["output_rho"] != 0.0
    else:
        grads = readouts.gradients()
    assert grads.names == READOUT_NAMES
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(readouts.theta_u.shape, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    # Central differences at steps h and h/2: D(h) = D' + C h^2 + O(h^4) + O(eps S / h), so the
    # Richardson value (4 D(h/2) - D(h)) / 3 has truncation O(h^4), far below the gap
    # |D(h) - D(h/2)| = 3/4 C h^2 (h = 1e-3 on a unit direction, theta entries O(0.1-1)), and the
    # gap bounds its error. Round-off: each readout is a float64 ratio of sums of ~1e4 terms of
    # size <= S = 1 + |R| (normalised readouts are O(1)), absolute error <= 1e4 eps S; through
    # the two differences it contributes 4 * 1e4 eps S / h.
    h = 1e-3
    d1, scale = _central(readouts, direction, h, center)
    d2, _ = _central(readouts, direction, h / 2, center)
    for name in grads.names:
        exact = float(grads.gradient(name) @ direction.numpy())
        richardson = (4 * d2[name] - d1[name]) / 3
        tol = abs(d1[name] - d2[name]) + 4 * 1e4 * EPS * scale[name] / h
        assert abs(richardson - exact) <= tol, (name, richardson, exact, tol)
        # Not vacuous: the check resolves a relative gradient error of 1e-4 (measured: <= 3e-6).
        assert tol <= 1e-4 * abs(exact), (name, tol, exact)


def test_readouts_are_zero_at_theta_u_and_one_at_theta_0(built):
    r = built["readouts"]
    at_u, at_0 = r.values(r.theta_u), r.values(r.theta_0)
    for name in ("rho", "output_rho", "forget_loss_recovery"):
        assert at_u[name] == 0.0
        assert at_0[name] == pytest.approx(1.0, abs=1e-12)  # same float64 sums, another order


def test_sampler_is_bridge_generate(built):
    """The differentiable sampler draws the images ddim_sample draws (same seeds and steps)."""
    from bridge.generate import ddim_sample
    from bridge.sampler import sample_at

    r, probe = built["readouts"], built["probes"].sampler
    with torch.no_grad():
        ours = sample_at(r.unet, r.group, r.theta_u, probe)
    ref = ddim_sample(
        r.unet,
        probe.cond,
        probe.uncond,
        scheduler=built["scheduler"],
        seeds=list(probe.seeds),
        steps=probe.steps,
        guidance_scale=probe.guidance_scale,
    )
    # ddim_sample returns float32: the float64 samples rounded to float32 agree to its eps.
    np.testing.assert_allclose(ours.float().numpy(), ref.numpy(), rtol=0, atol=4e-7)
    # Gradient checkpointing changes memory, not numbers.
    leaf = r.theta_u.clone().requires_grad_(True)
    g_plain = torch.autograd.grad(sample_at(r.unet, r.group, leaf, probe).sum(), leaf)[0]
    g_ckpt = torch.autograd.grad(
        sample_at(r.unet, r.group, leaf, probe, checkpoint=True).sum(), leaf
    )[0]
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-12, atol=1e-14)


def test_bad_readout_inputs_are_one_line(built):
    from bridge.probes import Probes, SamplerProbe

    r = built["readouts"]
    message = "`steps` must be an integer >= 1 DDIM steps; got 0."
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplerProbe(r.probes.sampler.cond, r.probes.sampler.uncond, (1,), 0, 3.0, {})
    with pytest.raises(ValueError, match=re.escape("`seeds` is empty")):
        SamplerProbe(r.probes.sampler.cond, r.probes.sampler.uncond, (), 4, 3.0, {})
    # A classifier that ignores the image: presence does not depend on the group.
    flat = ReadoutSet(
        built["base"],
        built["unlearned"],
        built["group"],
        built["probes"],
        log_probs=lambda x: torch.log_softmax(torch.zeros(x.shape[0], 3, dtype=x.dtype), -1),
        concept=0,
    )
    message = (
        f"readout `presence` has zero gradient over group {built['group'].spec!r}: it does not "
        "depend on the fine-tuned parameters; fine-tune a group it depends on."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        flat.gradients(["presence"])
    with pytest.raises(ValueError, match=re.escape("delta = theta_u - theta_0 is zero over group")):
        ReadoutSet(built["base"], built["base"], built["group"], built["probes"])
    no_sampler = Probes(built["probes"].finetune, built["probes"].forget, None, 0)
    with pytest.raises(ValueError, match=re.escape("presence needs `probes.sampler`")):
        ReadoutSet(
            built["base"], built["unlearned"], built["group"], no_sampler,
            log_probs=lambda x: x, concept=0,
        )


def test_group_must_cover_the_edit(built):
    from bridge.groups import select_group
    from bridge.hygiene import check_group_covers_edit, edited_tensors

    base, unlearned = built["base"], built["unlearned"]
    assert edited_tensors(base, unlearned) == list(built["group"].names)
    assert check_group_covers_edit(base, unlearned, built["group"]) is built["group"]
    only_k = select_group(base, r"down_blocks\.0\..*attn2\.to_k\.")
    v_name = next(n for n in built["group"].names if "to_v" in n)
    message = (
        f"group {only_k.spec!r} misses 1 edited tensors (e.g. {v_name!r}); uce edits "
        "cross-attention to_k, to_v (closed form) (group 'cross-attn-kv'): the readouts would "
        "not reach theta_0; measure that group."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        check_group_covers_edit(base, unlearned, only_k, method="uce")
