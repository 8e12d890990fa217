"""The lr-sweep adapter reproduces bridge.measure.measure_resurgence's predicted rho exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bridge.measure import measure_resurgence
from bridge.testbed.predict import finetune_probe_batches, predict_rho_over_lrs
from bridge.unlearn import apply_uce, uce_token_embeddings


def test_adapter_equals_measure_resurgence(world, world_model):
    unet, text, sched = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), edit="v")
    ids = torch.tensor([1, 2, 3, 1])
    images = world.sample(ids, torch.Generator().manual_seed(0))
    captions = [world.captions[i] for i in ids.tolist()]
    steps = [0, 5, 20]
    ref = measure_resurgence(
        unet,
        unlearned,
        text,
        forget_prompts=["a red circle"],
        finetune_prompts=captions,
        finetune_latents=images,
        top_k=3,
        lr=0.2,
        steps=steps,
        seed=0,
        batch_size=2,
        alphas_cumprod=sched.alphas_cumprod,
    )
    batches = finetune_probe_batches(
        text, captions, images, sched.alphas_cumprod, batch_size=2, seed=0
    )
    got = predict_rho_over_lrs(
        unet, unlearned, batches, lrs=[0.1, 0.2], steps=steps, top_k=3, seed=0, tol=1e-10
    )
    # same frozen loss, same Lanczos start; eigsh to 1e-10 on both sides -> float32 HVP round-off
    np.testing.assert_allclose(got.predicted_rho[1], ref.predicted_rho, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-4, atol=1e-9)
    assert got.predicted_rho[0, 0] == 0.0
    with pytest.raises(ValueError, match=re.escape("give exactly one of `lrs` and `lr_fractions`")):
        predict_rho_over_lrs(unet, unlearned, batches, steps=steps)
