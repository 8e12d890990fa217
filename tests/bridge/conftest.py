"""Shared tiny-model cases for the bridge tests (style.md s.6: test cases as data).

Every case is small enough that a dense Hessian of its parameter group takes a few seconds on one
CPU core: sample_size 8 latents, one probe batch of two samples, and a group of 128 parameters
(the K projection of the first cross-attention block).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CASES = [
    {
        "id": "tiny-k-f64",
        "seed": 0,
        "unet": {"sample_size": 8},
        "group": r"down_blocks\.0\..*attn2\.to_k\.",
        "dtype": torch.float64,
        "batches": 1,
        "batch_size": 2,
    },
]

PROMPTS = ["a photo of a cat", "a painting of a dog", "van gogh style church", "a red car"]


def build_case(case: dict):
    """Build (unet, text encoder, frozen loss) for a case dict."""
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss, make_probe_batches
    from bridge.tiny import (
        TextEncoder,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        tiny_scheduler,
    )

    unet = build_tiny_unet(case["seed"], **case["unet"]).to(case["dtype"])
    tok = build_word_tokenizer()
    text = TextEncoder(tok, build_tiny_text_encoder(tok, seed=case["seed"]).to(case["dtype"]))
    n = case["batches"] * case["batch_size"]
    cond = text.encode_prompts((PROMPTS * n)[:n])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    size = unet.config.sample_size
    latents = torch.randn(
        n, unet.config.in_channels, size, size, generator=gen, dtype=torch.float64
    )
    batches = make_probe_batches(
        latents.to(case["dtype"]),
        cond,
        tiny_scheduler().alphas_cumprod,
        batch_size=case["batch_size"],
        seed=case["seed"],
    )
    group = select_group(unet, case["group"])
    return unet, text, FrozenDiffusionLoss(unet, group, batches)


@pytest.fixture(scope="session", params=CASES, ids=[c["id"] for c in CASES])
def case(request):
    """A built case: dict with unet, text, loss, and the dense Hessian (computed once)."""
    import warnings

    from bridge.curvature import HessianOperator
    from bridge.spectra import dense_hessian

    unet, text, loss = build_case(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(loss)
        dense = dense_hessian(op)
    return {**request.param, "unet": unet, "text": text, "loss": loss, "op": op, "dense": dense}
