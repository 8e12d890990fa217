"""`resurgence bridge finetune | demo`: tracked fine-tuning and the CPU testbed (unlearn: cli_bridge_unlearn).

torch/diffusers are imported inside the commands so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from experiments import _validate as check
from experiments._validate import blame, one_line_errors


def _recorded_edit(unlearned: Path) -> tuple[str | None, str | None]:
    """(method, edited group) from the manifest.json `resurgence bridge unlearn` wrote next to
    ``unlearned`` (the pipeline folder, or the parent of its unet/), else (None, None)."""
    from bridge.hygiene import method_group

    found = [unlearned / "manifest.json"]
    if unlearned.name == "unet":
        found.append(unlearned.parent / "manifest.json")
    for path in found:
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
            method = manifest.get("method")
            group = (manifest.get("args") or {}).get("edited_group")
            if method is not None and group is None:
                group = method_group(method)
        except (OSError, ValueError, AttributeError):  # not ours: the loader judges the folder
            return None, None
        return method, group
    return None, None


def _scheduler(folder: Path):
    """The training scheduler saved in ``folder/scheduler/`` (its class named in the config)."""
    import diffusers

    sched_dir = folder / "scheduler"
    name = json.loads((sched_dir / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(str(sched_dir))


@one_line_errors
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
    measured_group: Annotated[
        str | None,
        typer.Option(
            "--measured-group",
            help="Group over which rho is measured (preset or regex; default: the group of the "
            "method in --unlearned's manifest.json, else cross-attn-kv). Must cover the edit.",
        ),
    ] = None,
    schedule: Annotated[
        str, typer.Option("--schedule", help="Learning-rate schedule: constant or cosine (to 0).")
    ] = "constant",
    grad_clip: Annotated[
        float | None, typer.Option("--grad-clip", help="Max gradient norm (clip before each step).")
    ] = None,
    ema_decay: Annotated[
        float | None, typer.Option("--ema-decay", help="EMA of the weights (diffusers EMAModel).")
    ] = None,
    guard: Annotated[
        str,
        typer.Option(
            "--guard",
            help="none, forget-subspace (updates off the forget readouts' gradients) or "
            "retain-core (PGU-style baseline, needs --retain-prompt).",
        ),
    ] = "none",
    guard_refresh: Annotated[
        int, typer.Option("--guard-refresh", help="Steps between guard re-estimates.")
    ] = 10,
    guard_restore: Annotated[
        bool,
        typer.Option(
            "--guard-restore/--no-guard-restore",
            help="forget-subspace: at each re-estimate also return the readouts to their values "
            "at the unlearned weights (cancels the projection's second-order drift).",
        ),
    ] = True,
    retain_prompt: Annotated[
        list[str] | None,
        typer.Option("--retain-prompt", help="Retained concept prompt for --guard retain-core."),
    ] = None,
    classifier: Annotated[
        Path | None,
        typer.Option(
            "--classifier",
            help="Testbed concept classifier (state dict, e.g. RUN/classifier.pt of `bridge "
            "demo`): --guard forget-subspace then holds its presence of each --forget-prompt.",
        ),
    ] = None,
    presence_class: Annotated[
        int | None,
        typer.Option("--presence-class", help="The erased concept's class in --classifier."),
    ] = None,
    guard_seeds: Annotated[
        int,
        typer.Option(
            "--guard-seeds",
            help="DDIM seeds of the guard's presence readout (with --classifier); presence is "
            "held on these seeds, so judge it on others.",
        ),
    ] = 256,
    sample_steps: Annotated[
        int, typer.Option("--sample-steps", help="DDIM steps of the guard's presence readout.")
    ] = 15,
    guidance_scale: Annotated[
        float, typer.Option("--guidance-scale", help="CFG scale of the guard's presence readout.")
    ] = 3.0,
) -> None:
    """Fine-tune an unlearned UNet on a captioned image folder, tracking rho, forget-loss recovery
    and (with --clip-weights) CLIP-score presence of the erased prompts.

    --guard forget-subspace projects every update off the gradients of output_rho and
    forget_loss_recovery of each --forget-prompt (its synonyms: repeat the option), re-estimated
    every --guard-refresh steps; the share of each update it removed is in history.json. At each
    re-estimate it also corrects the readouts' drift from their unlearned values
    (--no-guard-restore: projection only). With --classifier and --presence-class it holds the
    classifier's presence (and its log-probability) of each prompt's DDIM samples on --guard-seeds
    seeds instead, and restores presence.

    --measured-group must hold every tensor the unlearning edited (ESD-u edits no cross-attention:
    its manifest's group, non-cross-attn, is the default); a group that misses the edit is refused.

    Every argument is checked before any weights load; a bad one exits with code 2 and one line."""
    check.at_least("--steps", steps, 0)
    check.positive("--lr", lr)
    for option, value in (
        ("--lora-rank", lora_rank),
        ("--batch-size", batch_size),
        ("--track-every", track_every),
        ("--presence-seeds", presence_seeds),
        ("--guard-refresh", guard_refresh),
        ("--guard-seeds", guard_seeds),
        ("--sample-steps", sample_steps),
    ):
        check.at_least(option, value, 1)
    if grad_clip is not None:
        check.positive("--grad-clip", grad_clip)
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise check.UsageError(f"`--ema-decay` must be in (0, 1); got {ema_decay!r}.")
    import torch

    from bridge.finetune import OPTIMIZERS, SCHEDULES, FinetuneConfig, FinetuneData
    from bridge.guard import GUARDS

    check.choice("--optimizer", optimizer, OPTIMIZERS)
    check.choice("--schedule", schedule, SCHEDULES)
    check.choice("--guard", guard, ("none", *GUARDS))
    if guard == "retain-core" and not retain_prompt:
        raise check.UsageError("`--guard retain-core` needs at least one `--retain-prompt`.")
    if guard != "none" and trainable == "lora":
        raise check.UsageError("`--guard` projects the trained weights' updates: not with lora.")
    if classifier is not None and guard != "forget-subspace":
        raise check.UsageError("`--classifier` serves `--guard forget-subspace` only; add it.")
    if classifier is not None and (base / "vae").is_dir():
        raise check.UsageError(
            "`--classifier` is a pixel-space testbed classifier and --base has a VAE (latent "
            "samples); use the Python API with a classifier of decoded images."
        )
    log_probs = check.testbed_classifier(classifier, presence_class)
    cfg = FinetuneConfig(  # its own checks cannot fail after the ones above
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        trainable=trainable,
        lora_rank=lora_rank,
        batch_size=batch_size,
        track_every=track_every,
        checkpoint_every=track_every,
        seed=seed,
        schedule=schedule,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        measured_group=measured_group or "cross-attn-kv",
    )
    unet_dir = check.unet_folder("--base", base)
    check.pipeline_parts(
        "--base",
        base,
        {"text_encoder": "config.json", "tokenizer": None, "scheduler": "scheduler_config.json"},
    )
    check.unlearned_weights("--unlearned", unlearned)
    method, recorded_group = _recorded_edit(unlearned)
    if measured_group is None and recorded_group is not None:
        cfg = dataclasses.replace(cfg, measured_group=recorded_group)
    check.caption_folder("--data", data)
    check.parameter_group("--trainable", trainable, unet_dir, extra=("lora",))
    check.parameter_group("--measured-group", cfg.measured_group, unet_dir)
    if clip_weights is not None and not clip_weights.is_file():
        raise check.UsageError(
            f"`--clip-weights` {check.quote(clip_weights)} is not a file; give the local open_clip "
            "checkpoint (nothing is downloaded), or leave it out to skip CLIP presence."
        )

    from bridge.data import encode_caption_folder, load_caption_folder
    from bridge.finetune import finetune as run_finetune
    from bridge.loading import load_unet
    from bridge.loss import make_probe_batches, teacher_targets
    from bridge.sd import SDPipeline, load_text_encoder
    from bridge.unlearn_io import load_unlearned, write_json

    t0 = time.time()
    with blame("--base", base):
        base_unet = load_unet(base, device=device)
    with blame("--unlearned", unlearned):
        theta_u = load_unlearned(base_unet, unlearned).to(device)
    from bridge.hygiene import check_group_covers_edit, edited_tensors

    if not edited_tensors(base_unet, theta_u):  # the base's own weights: nothing was unlearned
        check.nonzero_displacement("--unlearned", unlearned, base_unet, theta_u, cfg.measured_group)
    try:  # the readouts put theta_0 back on the measured group: it must hold the whole edit
        check_group_covers_edit(base_unet, theta_u, cfg.measured_group, method=method)
    except ValueError as err:
        group = check.quote(cfg.measured_group)
        raise check.UsageError(f"`--measured-group` {group}: {err}") from None
    dtype = next(base_unet.parameters()).dtype
    with blame("--data", data):
        if (base / "vae").is_dir():  # real SD: VAE-encode (resized to the model's resolution)
            latents, captions = encode_caption_folder(
                base, data, base_unet, device=device, dtype=dtype
            )
        else:  # pixel-space testbed: strict size/mode checks, no silent resizing
            found = load_caption_folder(data, size=base_unet.config.sample_size)
            latents, captions = found.images.to(device, dtype), found.captions
            if latents.shape[1] != base_unet.config.in_channels:
                raise ValueError(
                    f"{base} has no vae/, so images are the UNet's inputs, but they have "
                    f"{latents.shape[1]} channels and the UNet expects "
                    f"{base_unet.config.in_channels}"
                )
    # Last: transformers prints a loading bar, and every input error should come before it.
    with blame("--base", base):
        pipe = SDPipeline(
            unet=base_unet,
            text_encoder=load_text_encoder(base, device=device),
            scheduler=_scheduler(base),
        )
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
    update_guard = None
    if guard == "forget-subspace":  # one Probes per prompt: each synonym adds its own gradients
        from bridge.guard import forget_subspace_guard
        from bridge.probes import Probes

        samplers = [None] * len(forget)
        if log_probs is not None:  # presence of each prompt's own samples
            from bridge.probes import sampler_probe

            samplers = [
                sampler_probe(text, p, scheduler=pipe.scheduler, seeds=range(guard_seeds),
                              steps=sample_steps, guidance_scale=guidance_scale)
                for p in forget_prompt
            ]  # fmt: skip
        per_prompt = [Probes([], [b], smp, seed) for b, smp in zip(forget, samplers, strict=True)]
        update_guard = forget_subspace_guard(
            pipe.unet, per_prompt, refresh_every=guard_refresh, restore=guard_restore,
            log_probs=log_probs, concept=presence_class,
        )  # fmt: skip
    elif guard == "retain-core":
        from bridge.guard import retain_core_guard
        from bridge.probes import finetune_probes

        retain = finetune_probes(
            text, list(retain_prompt) * 4, alphas_cumprod=pipe.scheduler.alphas_cumprod,
            batch_size=1, seed=seed, teacher=pipe.unet,
        )  # fmt: skip
        update_guard = retain_core_guard(retain, refresh_every=guard_refresh)
    presence = None
    if clip_weights is not None:
        from bridge.presence import ClipScorer, clip_presence_hook

        with blame("--clip-weights", clip_weights):
            scorer = ClipScorer.from_file(clip_weights, clip_arch)
        presence = clip_presence_hook(
            base, pipe, scorer, list(forget_prompt), list(range(presence_seeds))
        )
    res = run_finetune(
        theta_u,
        FinetuneData(latents, embeds, null),
        cfg,
        scheduler=pipe.scheduler,
        base_unet=pipe.unet,
        forget_batches=forget,
        presence=presence,
        guard=update_guard,
        out_dir=out,
    )
    res.unet.save_pretrained(out / "unet")
    from theory._manifest import write_manifest

    write_manifest(
        out,
        config={
            "base": str(base),
            "unlearned": str(unlearned),
            "data": str(data),
            "forget_prompts": list(forget_prompt),
            "guard": None if update_guard is None else update_guard.spec(),
            **cfg.__dict__,
        },
        seeds={"seed": seed},
        wall_time=time.time() - t0,
    )
    last = res.history[-1]
    write_json(out / "final.json", last)
    typer.echo(json.dumps(last, indent=1))


@one_line_errors
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
    from bridge.testbed.demo import DemoConfig, load_demo_config, run_demo

    path = config or Path(__file__).resolve().parent / "configs" / "bridge_testbed.toml"
    if not path.is_file():
        raise check.UsageError(
            f"`--config` {check.quote(path)} is not a file; give a TOML file of flat keys, or "
            "leave it out for experiments/configs/bridge_testbed.toml."
        )
    with blame("--config", path):  # the file alone first, so each error names its source
        load_demo_config(path, [])
    known = sorted(f.name for f in dataclasses.fields(DemoConfig))  # what load_demo_config reads
    for item in set_ or []:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in known:
            raise check.UsageError(
                f"`--set` {check.quote(item)} must be KEY=VALUE with KEY one of {', '.join(known)} "
                "(VALUE in TOML syntax, e.g. --set seed=1)."
            )
    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    with blame("--set", " ".join(set_ or [])):
        cfg = load_demo_config(path, overrides)
    summary = run_demo(cfg, out, figures=figures)
    brief = {
        m: {k: v for k, v in s.items() if not k.endswith("history") and k != "prediction"}
        for m, s in summary["methods"].items()
    }
    headline = {  # predicted vs measured, per readout: pooled Spearman and median |error|
        name: {k: stats["pooled"][k] for k in ("spearman", "median_abs_error")}
        for name, stats in summary["metrics"].items()
    }
    typer.echo(
        json.dumps(
            {
                "classifier_heldout_accuracy": summary["classifier_heldout_accuracy"],
                "predicted_vs_measured": headline,
                "methods": brief,
                "wall_time_s": summary["wall_time_s"],
            },
            indent=1,
        )
    )
