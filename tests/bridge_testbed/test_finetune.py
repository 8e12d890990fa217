"""Fine-tuning: rho against its definition, resume equals an uninterrupted run, NaN stops."""

from __future__ import annotations

import re

import pytest
import torch

from bridge.finetune import (
    FinetuneConfig,
    FinetuneData,
    NonFiniteLossError,
    finetune,
    group_values,
    resurgence_rho,
)
from bridge.groups import select_group
from bridge.loss import make_probe_batches
from bridge.unlearn import apply_uce, uce_token_embeddings


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(world, world_model):
    unet, text, sched = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 2, 3] * 4)  # every concept but "a red circle"
    images = world.sample(ids, g)
    emb = text.encode_prompts(list(world.captions))
    data = FinetuneData(images, emb[ids], text.encode_prompts([""]))
    forget = make_probe_batches(
        world.sample(torch.zeros(4, dtype=torch.long), g),
        emb[:1],
        sched.alphas_cumprod,
        batch_size=4,
        seed=1,
    )
    return unet, unlearned, data, sched, forget


def test_rho_tracking_equals_definition(setup):
    base, unlearned, data, sched, forget = setup
    cfg = FinetuneConfig(
        steps=4, lr=1e-2, optimizer="sgd", batch_size=4, trainable="cross-attn", track_every=2
    )
    res = finetune(
        unlearned, data, cfg, scheduler=sched, base_unet=base, forget_batches=forget, progress=False
    )
    group = select_group(base, "cross-attn-kv")
    t0, tu, tt = group.values(base), group.values(unlearned), group.values(res.unet)
    delta = tu - t0
    want = -float((tt - tu).double() @ delta.double()) / float(delta.double() @ delta.double())
    assert [h["step"] for h in res.history] == [0, 2, 4]
    assert res.history[0]["rho"] == 0.0 and res.history[0]["forget_loss_recovery"] == 0.0
    assert res.history[-1]["rho"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert want != 0.0
    with pytest.raises(ValueError, match=re.escape("delta = theta_u - theta_0 is zero")):
        resurgence_rho(t0, t0, t0)


def test_resume_after_interrupt_equals_uninterrupted_run(setup, tmp_path):
    base, unlearned, data, sched, forget = setup
    cfg = FinetuneConfig(
        steps=6,
        lr=1e-3,
        optimizer="adamw",
        batch_size=4,
        trainable="all",
        track_every=2,
        checkpoint_every=2,
        p_null=0.25,
    )
    full = finetune(unlearned, data, cfg, scheduler=sched, base_unet=base, progress=False)

    def stop_at_5(step):
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):  # killed after step 5; last checkpoint is step 4
        finetune(
            unlearned,
            data,
            cfg,
            scheduler=sched,
            base_unet=base,
            out_dir=tmp_path,
            on_step=stop_at_5,
            progress=False,
        )
    resumed = finetune(
        unlearned, data, cfg, scheduler=sched, base_unet=base, out_dir=tmp_path, progress=False
    )
    for (n, a), b in zip(full.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert resumed.history == full.history
    other = FinetuneConfig(steps=6, lr=2e-3)
    with pytest.raises(ValueError, match=re.escape("was written with another fine-tuning config")):
        finetune(unlearned, data, other, scheduler=sched, out_dir=tmp_path, progress=False)


def test_non_finite_loss_stops_with_last_good_state(setup, tmp_path):
    base, unlearned, data, sched, _ = setup
    cfg = FinetuneConfig(
        steps=20, lr=1e6, optimizer="sgd", batch_size=4, trainable="all", checkpoint_every=100
    )
    with pytest.raises(
        NonFiniteLossError, match=r"fine-tuning loss is (nan|inf) at step \d+.*last good state"
    ):
        finetune(unlearned, data, cfg, scheduler=sched, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_lora_finetune_moves_merged_weights_and_rho(setup):
    base, unlearned, data, sched, _ = setup
    cfg = FinetuneConfig(
        steps=3,
        lr=1e-2,
        optimizer="adamw",
        batch_size=4,
        trainable="lora",
        lora_rank=2,
        track_every=3,
    )
    res = finetune(unlearned, data, cfg, scheduler=sched, base_unet=base, progress=False)
    group = select_group(base, "cross-attn-kv")
    # the merged UNet carries the LoRA update, and tracking measured exactly that
    assert not torch.equal(group.values(res.unet), group.values(unlearned))
    want = resurgence_rho(
        group_values(res.unet, group), group.values(unlearned), group.values(base)
    )
    assert res.history[-1]["rho"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    names = {n for n, _ in res.unet.named_parameters()}
    assert names == {n for n, _ in base.named_parameters()}  # plain UNet, no adapter left


def test_full_batch_gd_is_gd_on_the_frozen_loss(setup):
    base, unlearned, data, sched, forget = setup
    from bridge.loss import FrozenDiffusionLoss

    data_fb = FinetuneData(data.images, data.embeddings, probe_batches=forget)
    cfg = FinetuneConfig(
        steps=1, lr=0.5, optimizer="sgd", trainable="cross-attn-kv", full_batch=True, track_every=1
    )
    res = finetune(unlearned, data_fb, cfg, scheduler=sched, base_unet=base, progress=False)
    group = select_group(base, "cross-attn-kv")
    loss = FrozenDiffusionLoss(unlearned, group, forget)
    want = group.values(unlearned) - 0.5 * loss.gradient()
    # float32 forward/backward in two code paths: agreement to ~1e-6 relative
    torch.testing.assert_close(group.values(res.unet), want, rtol=1e-5, atol=1e-6)
