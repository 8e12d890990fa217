"""A float64 tiny UNet with a UCE-like edit, its probes, a smooth classifier and its readouts.

Shared by the readout, curvature-stage and prediction tests (built once per module).
"""

from __future__ import annotations

import copy

import torch

#: The group: K and V of the first cross-attention block (256 parameters: a dense Hessian in
#: seconds). The forget prompt, fine-tuning prompts and sampler settings are the smallest that
#: exercise every code path (guidance != 1, several seeds, several batches).
GROUP = r"down_blocks\.0\..*attn2\.to_[kv]\."
FORGET = "a photo of a cat"
FINETUNE = ["a red car", "a painting of a dog", "van gogh style church", "a dog in the city"]
SEEDS = (11, 12, 13)


def smooth_classifier(channels: int, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A random conv classifier with tanh (smooth, so finite differences see no kinks), float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 6, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(6, classes),
        ).double()
    return net.requires_grad_(False)


def build_readout_case(seed: int = 0, *, edit_scale: float = 0.3):
    """dict: base, unlearned, text, group, probes, finetune loss, readouts (float64)."""
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss
    from bridge.probes import Probes, finetune_probes, forget_probes, sampler_probe
    from bridge.readouts import ReadoutSet
    from bridge.tiny import (
        TextEncoder,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        tiny_scheduler,
    )

    base = build_tiny_unet(seed, sample_size=8).double().eval()
    tok = build_word_tokenizer()
    text = TextEncoder(tok, build_tiny_text_encoder(tok, seed=seed).double())
    group = select_group(base, GROUP)
    unlearned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # a rank-1 edit per matrix, as UCE makes for one erased concept
        for name in group.names:
            w = unlearned.get_parameter(name)
            u = torch.randn(w.shape[0], generator=gen, dtype=w.dtype)
            v = torch.randn(w.shape[1], generator=gen, dtype=w.dtype)
            w += edit_scale * torch.outer(u, v) / (u.norm() * v.norm()) * w.norm()
    sched = tiny_scheduler()
    sampler = sampler_probe(text, FORGET, scheduler=sched, seeds=SEEDS, steps=4, guidance_scale=3.0)
    common = {"alphas_cumprod": sched.alphas_cumprod, "batch_size": 2, "seed": seed}
    probes = Probes(
        finetune=finetune_probes(text, FINETUNE, teacher=base, **common),
        forget=forget_probes(text, [FORGET], base=base, sampler=sampler, **common),
        sampler=sampler,
        seed=seed,
    )
    classifier = smooth_classifier(base.config.in_channels, seed=seed)
    readouts = ReadoutSet(
        base,
        unlearned,
        group,
        probes,
        log_probs=lambda x: torch.log_softmax(classifier(x), dim=-1),
        concept=1,
    )
    return {
        "base": base,
        "unlearned": unlearned,
        "text": text,
        "group": group,
        "probes": probes,
        "scheduler": sched,
        "finetune_loss": FrozenDiffusionLoss(unlearned, group, probes.finetune),
        "readouts": readouts,
        "classifier": classifier,
    }
