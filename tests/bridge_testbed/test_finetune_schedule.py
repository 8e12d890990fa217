"""The authors' fine-tuning knobs: cosine schedule, gradient clipping, EMA, and their resume.

Each check replays full-batch SGD by hand on a float64 copy of the model (autograd on the same
loss) and compares with :func:`bridge.finetune.finetune`. Tolerance: a step is ~1e-4 of the
weights it moves, so float64 round-off (eps 2.2e-16, times the weight/step ratio and a few hundred
accumulated terms) stays below 1e-9 relative to the step; float32 would not (1e-3).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re

import pytest
import torch

from bridge.finetune import FinetuneConfig, FinetuneData, finetune, resurgence_rho
from bridge.groups import select_group
from bridge.loss import make_probe_batches
from bridge.unlearn import apply_uce, uce_token_embeddings

REL = 1e-9


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(world, world_model):
    unet, text, sched = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    unet, unlearned = copy.deepcopy(unet).double(), unlearned.double()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 2, 3] * 2)
    emb = text.encode_prompts(list(world.captions)).double()
    images = world.sample(ids, g).double()
    batches = make_probe_batches(images, emb[ids], sched.alphas_cumprod, batch_size=3, seed=3)
    stochastic = FinetuneData(images, emb[ids], text.encode_prompts([""]).double())
    return unet, unlearned, FinetuneData(probe_batches=batches), stochastic, sched


def _full_batch_loss(model, batches):
    total = 0.0
    for b in batches:
        err = model(b.noisy, b.timesteps, encoder_hidden_states=b.cond).sample - b.target
        total = total + (err * err).mean()
    return total / len(batches)


def _hand_sgd(unlearned, batches, spec, lrs):
    """theta_k of SGD by hand over ``spec`` with step sizes ``lrs`` (flat vectors per step)."""
    model = copy.deepcopy(unlearned).eval()
    group = select_group(model, spec)
    params = dict(model.named_parameters())
    tensors = [params[n] for n in group.names]
    out = [group.values(model)]
    for lr in lrs:
        grads = torch.autograd.grad(_full_batch_loss(model, batches), tensors)
        with torch.no_grad():
            for p, g in zip(tensors, grads, strict=True):
                p -= lr * g
        out.append(group.values(model))
    return out, group


def _close(a, b):
    return float((a - b).norm()) <= REL * float(b.norm())


def test_cosine_lr_read_from_the_optimizer_and_the_updates_it_makes(setup):
    base, unlearned, data, _, sched = setup
    steps, lr = 4, 0.05
    cfg = FinetuneConfig(
        steps=steps, lr=lr, optimizer="sgd", trainable="cross-attn-kv", full_batch=True,
        track_every=1, schedule="cosine",
    )  # fmt: skip
    res = finetune(unlearned, data, cfg, scheduler=sched, progress=False)
    for rec in res.history[1:]:  # the optimizer's lr after step k: half-cosine at k / steps
        k = rec["step"]
        assert rec["lr"] == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * k / steps)), abs=1e-15)
    assert res.history[-1]["lr"] == pytest.approx(0.0, abs=1e-15)
    lrs = [0.5 * lr * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    path, group = _hand_sgd(unlearned, data.probe_batches, "cross-attn-kv", lrs)
    assert _close(group.values(res.unet), path[-1])
    constant, _ = _hand_sgd(unlearned, data.probe_batches, "cross-attn-kv", [lr] * steps)
    assert not _close(group.values(res.unet), constant[-1])  # the schedule made a difference


def test_grad_clip_bounds_the_sgd_update_to_lr_times_clip(setup):
    base, unlearned, data, _, sched = setup
    lr = 0.1
    path, group = _hand_sgd(unlearned, data.probe_batches, "cross-attn-kv", [lr])
    free = float((path[1] - path[0]).norm()) / lr  # ||grad|| at theta_u
    clip = 0.25 * free
    cfg = FinetuneConfig(
        steps=1, lr=lr, optimizer="sgd", trainable="cross-attn-kv", full_batch=True, grad_clip=clip
    )
    res = finetune(unlearned, data, cfg, scheduler=sched, progress=False)
    step = group.values(res.unet) - path[0]
    assert float(step.norm()) <= lr * clip
    coef = clip / (free + 1e-6)  # torch's clip coefficient (its 1e-6 guards a zero norm)
    assert float(step.norm()) == pytest.approx(lr * clip * free / (free + 1e-6), rel=REL)
    assert _close(step, coef * (path[1] - path[0]))  # the gradient's direction, rescaled
    loose = dataclasses.replace(cfg, grad_clip=2 * free)  # above the norm: no change
    res = finetune(unlearned, data, loose, scheduler=sched, progress=False)
    assert _close(group.values(res.unet), path[1])


def test_ema_equals_the_hand_recursion_and_feeds_the_readouts(setup):
    base, unlearned, data, _, sched = setup
    lr, decay, steps = 0.05, 0.2, 3
    cfg = FinetuneConfig(
        steps=steps, lr=lr, optimizer="sgd", trainable="cross-attn-kv", full_batch=True,
        track_every=1, ema_decay=decay,
    )  # fmt: skip
    res = finetune(unlearned, data, cfg, scheduler=sched, base_unet=base, progress=False)
    path, group = _hand_sgd(unlearned, data.probe_batches, "cross-attn-kv", [lr] * steps)
    # diffusers EMAModel: decay 0 at update 1, then min(decay, k / (9 + k)) at update k
    ema = path[1]
    for k in range(2, steps + 1):
        d = min(decay, k / (9 + k))
        ema = d * ema + (1 - d) * path[k]
    assert min(decay, 2 / 11) != decay and min(decay, 3 / 12) == decay  # both branches used
    assert _close(group.values(res.unet), ema)
    assert not _close(ema, path[-1])
    want = resurgence_rho(ema, group.values(unlearned), group.values(base))
    assert res.history[-1]["rho"] == pytest.approx(want, rel=1e-4)


def test_resume_with_cosine_clip_and_ema_equals_uninterrupted_run(setup, tmp_path):
    base, unlearned, _, data, sched = setup
    cfg = FinetuneConfig(
        steps=6, lr=1e-3, optimizer="adamw", batch_size=3, trainable="cross-attn",
        track_every=2, checkpoint_every=2, schedule="cosine", grad_clip=0.5, ema_decay=0.9,
    )  # fmt: skip
    full = finetune(unlearned, data, cfg, scheduler=sched, base_unet=base, progress=False)

    def stop_at_5(step):
        if step == 5:
            raise _Interrupt

    kw = dict(scheduler=sched, base_unet=base, out_dir=tmp_path, progress=False)
    with pytest.raises(_Interrupt):
        finetune(unlearned, data, cfg, on_step=stop_at_5, **kw)
    resumed = finetune(unlearned, data, cfg, **kw)
    for (n, a), b in zip(full.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert resumed.history == full.history
    plain = finetune(unlearned, data, dataclasses.replace(cfg, ema_decay=None), scheduler=sched,
                     progress=False)  # fmt: skip
    assert not torch.equal(
        select_group(base, "cross-attn").values(plain.unet),
        select_group(base, "cross-attn").values(full.unet),
    )


def test_digest_of_configs_without_the_new_fields_is_unchanged():
    cfg = FinetuneConfig(steps=7, lr=3e-4)
    old = {k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("schedule", "grad_clip", "ema_decay")}  # fmt: skip
    want = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.digest() == want
    assert dataclasses.replace(cfg, schedule="cosine").digest() != want
    assert dataclasses.replace(cfg, grad_clip=1.0).digest() != want
    assert dataclasses.replace(cfg, ema_decay=0.99).digest() != want


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schedule", "linear", "`schedule` must be one of ['constant', 'cosine'], got 'linear'."),
        ("grad_clip", 0.0, "`grad_clip` must be a finite max norm > 0 or None, got 0.0."),
        ("grad_clip", math.inf, "`grad_clip` must be a finite max norm > 0 or None, got inf."),
        ("ema_decay", 1.0, "`ema_decay` must be in (0, 1) or None, got 1.0."),
    ],
)
def test_bad_protocol_knobs_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FinetuneConfig(**{field: value})


def test_undefined_forget_loss_recovery_is_left_out_with_a_warning(setup):
    base, unlearned, data, _, sched = setup
    b = data.probe_batches[0]
    # zero conditioning: K = W_k 0 = 0 and V = 0, so the K/V edit changes no forget output
    forget = [dataclasses.replace(b, cond=torch.zeros_like(b.cond))]
    cfg = FinetuneConfig(steps=1, lr=1e-3, optimizer="sgd", trainable="cross-attn-kv",
                         full_batch=True)  # fmt: skip
    with pytest.warns(UserWarning, match=re.escape("`forget_loss_recovery` is undefined")):
        res = finetune(unlearned, data, cfg, scheduler=sched, base_unet=base,
                       forget_batches=forget, progress=False)  # fmt: skip
    assert all("forget_loss_recovery" not in r and "forget_loss" in r for r in res.history)
