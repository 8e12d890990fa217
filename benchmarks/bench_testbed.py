"""Benchmark of the bridge testbed stages (CPU) and, with --gpu-sd14, of SD-v1.4-sized steps.

CPU part: seconds per unit of each testbed stage at the demo's default sizes, each also as a
ratio to one reference forward pass of the UNet at batch 64 measured in the same run (so numbers
from a loaded machine stay comparable), and the process's peak resident memory after each stage.

GPU part (``--gpu-sd14``): a UNet with Stable Diffusion v1.4's config and random weights (nothing
downloaded); seconds per AdamW fine-tuning step (batch 4, 64x64 latents, fp32 weights, bf16
autocast) and per UCE edit of all cross-attention K/V matrices (77-token prompts).

    python benchmarks/bench_testbed.py                 # CPU, ~1-2 minutes
    python benchmarks/bench_testbed.py --gpu-sd14      # one GPU, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from benchmarks._sd14 import SD14_UNET_CONFIG as SD14_UNET  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_cpu(threads: int) -> dict:
    from bridge.curvature import HessianOperator
    from bridge.finetune import FinetuneConfig, FinetuneData, finetune
    from bridge.generate import generate
    from bridge.groups import select_group
    from bridge.local_curvature import measure_local_curvature
    from bridge.loss import FrozenDiffusionLoss
    from bridge.probes import finetune_probes
    from bridge.testbed.classifier import train_classifier
    from bridge.testbed.demo import DemoConfig
    from bridge.testbed.train import ModelConfig, build_world_model, diffusion_loss
    from bridge.unlearn import apply_uce, esd, uce_token_embeddings

    torch.set_num_threads(threads)
    cfg = DemoConfig()
    world = cfg.world
    unet, text, sched = build_world_model(
        world, ModelConfig(block_out_channels=cfg.block_out_channels, text_dim=cfg.text_dim)
    )
    out: dict = {"threads": threads, "unet_parameters": sum(p.numel() for p in unet.parameters())}
    g = torch.Generator().manual_seed(0)
    emb = text.encode_prompts(list(world.captions))
    x = world.sample(torch.arange(64) % len(world.concepts), g)
    c = emb[torch.arange(64) % len(world.concepts)]
    t = torch.randint(0, 1000, (64,), generator=g)
    with torch.no_grad():
        ref = _time(lambda: unet(x, t, c), 3)
    out["reference_forward_b64_s"] = ref
    rows = {}

    def record(name, seconds, unit):
        rows[name] = {
            "seconds": round(seconds, 4),
            "unit": unit,
            "ratio_to_reference": round(seconds / ref, 2),
            "peak_rss_mib": round(_peak_mib(), 1),
        }

    opt = torch.optim.AdamW(unet.parameters(), 1e-3)

    def train_step():
        loss = diffusion_loss(
            unet,
            sched,
            x[: cfg.pretrain_batch],
            c[: cfg.pretrain_batch],
            t[: cfg.pretrain_batch],
            torch.randn_like(x[: cfg.pretrain_batch]),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    record("pretrain_step", _time(train_step, 3), f"AdamW step, batch {cfg.pretrain_batch}")
    t0 = time.perf_counter()
    train_classifier(world, steps=50)
    record("classifier_step", (time.perf_counter() - t0) / 50, "Adam step, batch 64")
    unet.eval()
    concepts = uce_token_embeddings(text, [cfg.erase])
    record("uce_edit", _time(lambda: apply_uce(unet, concepts), 3), "all cross-attn K/V")
    t0 = time.perf_counter()
    esd(unet, text, sched, [cfg.erase], steps=5, lr=cfg.esd_lr, progress=False)
    record("esd_x_step", (time.perf_counter() - t0) / 5, "ESD-x step (incl. partial DDIM)")
    prompts = [cfg.erase, *cfg.finetune_concepts]
    seeds = list(range(cfg.presence_seeds))
    t0 = time.perf_counter()
    generate(
        unet, text.encode_prompts, prompts, scheduler=sched, seeds=seeds, steps=cfg.sample_steps
    )
    record(
        "presence_eval", time.perf_counter() - t0, f"{len(prompts)} prompts x {len(seeds)} images"
    )
    ids = [world.concept_id(p) for p in cfg.finetune_concepts]
    ids = torch.tensor(ids).repeat_interleave(cfg.images_per_concept)
    images = world.sample(ids, g)
    caps = [world.captions[i] for i in ids.tolist()]
    batches = finetune_probes(
        text, caps, images, alphas_cumprod=sched.alphas_cumprod, batch_size=cfg.probe_batch, seed=0
    )
    edited = apply_uce(unet, concepts)
    t0 = time.perf_counter()
    loss = FrozenDiffusionLoss(edited, select_group(edited, "cross-attn-kv"), batches)
    op = HessianOperator(loss)
    curv = measure_local_curvature(op, top_k=cfg.top_k, krylov_depth=cfg.gd_steps)
    record(
        "curvature_measurement",
        time.perf_counter() - t0,
        f"{op.num_matvecs} HVPs: top_k={cfg.top_k} per end + closure + Krylov depth {cfg.gd_steps}",
    )
    del curv
    ft = FinetuneConfig(
        steps=5,
        lr=1.0,
        optimizer="sgd",
        trainable="cross-attn-kv",
        full_batch=True,
        track_every=100,
        checkpoint_every=100,
    )
    t0 = time.perf_counter()
    finetune(edited, FinetuneData(probe_batches=batches), ft, scheduler=sched, progress=False)
    record(
        "gd_step", (time.perf_counter() - t0) / 5, f"full-batch GD step over {len(images)} images"
    )
    ft = FinetuneConfig(
        steps=5, lr=cfg.adamw_lr, batch_size=cfg.adamw_batch, track_every=100, checkpoint_every=100
    )
    t0 = time.perf_counter()
    finetune(
        edited, FinetuneData(images, text.encode_prompts(caps)), ft, scheduler=sched, progress=False
    )
    record(
        "adamw_step",
        (time.perf_counter() - t0) / 5,
        f"AdamW step, whole UNet, batch {cfg.adamw_batch}",
    )
    out["stages"] = rows
    n = len(cfg.methods)
    out["estimated_demo_s"] = round(
        cfg.pretrain_steps * rows["pretrain_step"]["seconds"]
        + cfg.classifier_steps * rows["classifier_step"]["seconds"]
        + cfg.esd_steps
        * rows["esd_x_step"]["seconds"]
        * sum(m.startswith("esd") for m in cfg.methods)
        + (1 + n + n * 2 * (1 + cfg.adamw_steps // cfg.track_every))
        * rows["presence_eval"]["seconds"]
        + n * rows["curvature_measurement"]["seconds"]
        + n * len(cfg.gd_lr_fractions) * cfg.gd_steps * rows["gd_step"]["seconds"]
        + n * cfg.adamw_steps * rows["adamw_step"]["seconds"],
        1,
    )
    return out


def bench_gpu_sd14() -> dict:
    from diffusers import UNet2DConditionModel

    from bridge.unlearn import UCEConcepts, apply_uce

    dev = "cuda"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET).to(dev)
    out = {
        "device": torch.cuda.get_device_name(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }
    opt = torch.optim.AdamW(unet.parameters(), 1e-5)
    x = torch.randn(4, 4, 64, 64, device=dev)
    c = torch.randn(4, 77, 768, device=dev)
    t = torch.randint(0, 1000, (4,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ((unet(x, t, c).sample.float() - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()

    out["finetune_step_s"] = _time(step, 5)
    out["finetune_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # UCE: one erased concept (77 tokens) and 10 preserved prompts (77 tokens each)
    g = torch.Generator().manual_seed(0)
    concepts = UCEConcepts(
        torch.randn(77, 768, generator=g, dtype=torch.float64),
        torch.randn(77, 768, generator=g, dtype=torch.float64),
        torch.randn(770, 768, generator=g, dtype=torch.float64),
    )
    unet.eval()

    def edit():
        apply_uce(unet, concepts)
        torch.cuda.synchronize()

    out["uce_edit_s"] = _time(edit, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--gpu-sd14", action="store_true", help="also time SD-v1.4-sized steps on a GPU"
    )
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    args = parser.parse_args()
    result = {}
    if not args.skip_cpu:
        result["cpu"] = bench_cpu(args.threads)
    if args.gpu_sd14:
        result["gpu_sd14"] = bench_gpu_sd14()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
