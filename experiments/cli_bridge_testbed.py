"""`resurgence bridge unlearn | finetune | demo`: unlearning, tracked fine-tuning, the CPU testbed.

torch/diffusers are imported inside the commands so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

UNLEARN_METHODS = ("uce", "uce-v", "esd-x", "esd-u")


def unlearn(
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            help="Base SD/tiny pipeline folder (local: unet/ text_encoder/ tokenizer/ scheduler/).",
        ),
    ],
    erase: Annotated[
        list[str], typer.Option("--erase", help="Prompt to erase (repeat for several concepts).")
    ],
    method: Annotated[
        str, typer.Option("--method", help=f"One of {', '.join(UNLEARN_METHODS)}.")
    ] = "uce",
    anchor: Annotated[
        list[str] | None,
        typer.Option("--anchor", help="UCE anchor per erased prompt (default: the empty prompt)."),
    ] = None,
    preserve: Annotated[
        list[str] | None, typer.Option("--preserve", help="UCE prompt to preserve (repeatable).")
    ] = None,
    lam: Annotated[float, typer.Option("--lam", help="UCE ridge strength lambda.")] = 0.1,
    from_token: Annotated[
        str,
        typer.Option(
            "--from-token", help="UCE token tail: 'last' word (published) or 'first' word on."
        ),
    ] = "last",
    steps: Annotated[int, typer.Option("--steps", help="ESD optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="ESD Adam learning rate.")] = 1e-05,
    guidance: Annotated[float, typer.Option("--guidance", help="ESD negative guidance g.")] = 1.0,
    out: Annotated[
        Path, typer.Option("--out", help="Output pipeline folder (+ manifest.json).")
    ] = Path("runs/bridge_unlearn"),
    seed: Annotated[int, typer.Option("--seed", help="ESD seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="torch device (cpu, cuda).")] = "cpu",
) -> None:
    """Unlearn concepts from a local pipeline: UCE (closed form) or ESD-x / ESD-u (fine-tuning)."""
    from bridge.tiny import load_tiny_pipeline
    from bridge.unlearn import apply_uce, esd, uce_token_embeddings
    from bridge.unlearn_io import save_unlearned

    if method not in UNLEARN_METHODS:
        raise typer.BadParameter(
            f"`--method` must be one of {', '.join(UNLEARN_METHODS)}, got {method!r}"
        )
    t0 = time.time()
    pipe = load_tiny_pipeline(base, device=device)
    if pipe.text_encoder is None:
        raise typer.BadParameter(
            f"{base} has no text_encoder/: unlearning needs the prompts' embeddings"
        )
    if method.startswith("uce"):
        args = {
            "erase": erase,
            "anchors": anchor or None,
            "preserve": list(preserve or []),
            "lam": lam,
            "edit": "kv" if method == "uce" else "v",
            "from_token": from_token,
        }
        concepts = uce_token_embeddings(
            pipe.text_encoder, erase, args["anchors"], args["preserve"], from_token=from_token
        )
        unet = apply_uce(pipe.unet, concepts, edit=args["edit"], lam=lam)
        used_seed = None
    else:
        args = {
            "concepts": erase,
            "variant": method[-1],
            "steps": steps,
            "lr": lr,
            "guidance": guidance,
        }
        unet = esd(
            pipe.unet,
            pipe.text_encoder,
            pipe.scheduler,
            erase,
            variant=method[-1],
            steps=steps,
            lr=lr,
            guidance=guidance,
            seed=seed,
        )
        used_seed = seed
    save_unlearned(
        unet, out, method=method, args=args, seed=used_seed, base_unet=pipe.unet, base_folder=base
    )
    typer.echo(f"{method}: erased {erase} in {time.time() - t0:.1f} s -> {out}")


def finetune(
    base: Annotated[Path, typer.Option("--base", help="Base pipeline folder (theta_0).")],
    unlearned: Annotated[
        Path,
        typer.Option(
            "--unlearned",
            help="Unlearned pipeline/UNet folder or state-dict file (ours, MACE, SalUn, ...).",
        ),
    ],
    data: Annotated[
        Path, typer.Option("--data", help="Folder of images with same-stem .txt captions.")
    ],
    forget_prompt: Annotated[
        list[str], typer.Option("--forget-prompt", help="Erased concept prompt (repeatable).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (resumes if it holds a checkpoint).")
    ] = Path("runs/bridge_finetune"),
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-05,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adamw.")] = "adamw",
    trainable: Annotated[
        str,
        typer.Option(
            "--trainable", help="Parameter group (all, cross-attn, cross-attn-kv, regex) or lora."
        ),
    ] = "all",
    lora_rank: Annotated[
        int, typer.Option("--lora-rank", help="LoRA rank (with --trainable lora).")
    ] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 4,
    track_every: Annotated[
        int,
        typer.Option("--track-every", help="Steps between rho / presence records and checkpoints."),
    ] = 10,
    clip_weights: Annotated[
        Path | None,
        typer.Option("--clip-weights", help="open_clip weights file for CLIP-score presence."),
    ] = None,
    clip_arch: Annotated[
        str, typer.Option("--clip-arch", help="open_clip architecture of --clip-weights.")
    ] = "ViT-L-14",
    presence_seeds: Annotated[
        int, typer.Option("--presence-seeds", help="Images per prompt for presence.")
    ] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of minibatches, timesteps, noise.")] = 0,
    device: Annotated[str, typer.Option("--device", help="torch device.")] = "cpu",
) -> None:
    """Fine-tune an unlearned UNet on a captioned image folder, tracking rho, forget-loss recovery
    and (with --clip-weights) CLIP-score presence of the erased prompts."""
    import torch

    from bridge.data import encode_caption_folder, load_caption_folder
    from bridge.finetune import FinetuneConfig, FinetuneData
    from bridge.finetune import finetune as run_finetune
    from bridge.loss import make_probe_batches, teacher_targets
    from bridge.tiny import load_tiny_pipeline
    from bridge.unlearn_io import load_unlearned, write_json

    t0 = time.time()
    pipe = load_tiny_pipeline(base, device=device)
    theta_u = load_unlearned(pipe.unet, unlearned).to(device)
    dtype = next(pipe.unet.parameters()).dtype
    if (base / "vae").is_dir():  # real SD: VAE-encode (resized to the model's resolution)
        latents, captions = encode_caption_folder(base, data, pipe.unet, device=device, dtype=dtype)
    else:  # pixel-space testbed: strict size/mode checks, no silent resizing
        found = load_caption_folder(data, size=pipe.unet.config.sample_size)
        latents, captions = found.images.to(device, dtype), found.captions
    text = pipe.text_encoder
    embeds, null = text.encode_prompts(captions), text.encode_prompts([""])
    # forget loss: the base model's own predictions on the erased prompts (teacher target)
    sz = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(seed + 2)
    shape = (len(forget_prompt) * 4, pipe.unet.config.in_channels, sz, sz)
    x0 = torch.randn(shape, generator=gen).to(device)
    cond = text.encode_prompts(list(forget_prompt)).repeat_interleave(4, dim=0)
    forget = teacher_targets(
        pipe.unet,
        make_probe_batches(x0, cond, pipe.scheduler.alphas_cumprod, batch_size=4, seed=seed + 2),
    )
    presence = None
    if clip_weights is not None:
        from bridge.presence import ClipScorer, clip_presence_hook

        presence = clip_presence_hook(
            base,
            pipe,
            ClipScorer.from_file(clip_weights, clip_arch),
            list(forget_prompt),
            list(range(presence_seeds)),
        )
    cfg = FinetuneConfig(
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        trainable=trainable,
        lora_rank=lora_rank,
        batch_size=batch_size,
        track_every=track_every,
        checkpoint_every=track_every,
        seed=seed,
    )
    res = run_finetune(
        theta_u,
        FinetuneData(latents, embeds, null),
        cfg,
        scheduler=pipe.scheduler,
        base_unet=pipe.unet,
        forget_batches=forget,
        presence=presence,
        out_dir=out,
    )
    res.unet.save_pretrained(out / "unet")
    from experiments.manifest import write_manifest

    write_manifest(
        out,
        config={
            "base": str(base),
            "unlearned": str(unlearned),
            "data": str(data),
            "forget_prompts": list(forget_prompt),
            **cfg.__dict__,
        },
        seeds={"seed": seed},
        wall_time=time.time() - t0,
    )
    last = res.history[-1]
    write_json(out / "final.json", last)
    typer.echo(json.dumps(last, indent=1))


def demo(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="TOML config (default: experiments/configs/bridge_testbed.toml)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override KEY=VALUE (repeatable), e.g. --set pretrain_steps=400."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (finished stages are skipped).")
    ] = Path("runs/bridge_testbed"),
    figures: Annotated[
        Path, typer.Option("--figures", help="Folder for bridge_testbed_*.png.")
    ] = Path("figures"),
    seed: Annotated[int | None, typer.Option("--seed", help="Seed (overrides the config).")] = None,
) -> None:
    """The tiny CPU testbed end to end: pretrain, unlearn, predict, fine-tune, measure, figures."""
    from bridge.testbed.demo import load_demo_config, run_demo

    path = config or Path(__file__).resolve().parent / "configs" / "bridge_testbed.toml"
    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    try:
        cfg = load_demo_config(path, overrides)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    summary = run_demo(cfg, out, figures=figures)
    brief = {
        m: {k: v for k, v in s.items() if not k.endswith("history") and k != "eigenvalues"}
        for m, s in summary["methods"].items()
    }
    typer.echo(
        json.dumps(
            {
                "classifier_heldout_accuracy": summary["classifier_heldout_accuracy"],
                "rho_correlation": summary["rho_correlation"],
                "methods": brief,
                "wall_time_s": summary["wall_time_s"],
            },
            indent=1,
        )
    )
