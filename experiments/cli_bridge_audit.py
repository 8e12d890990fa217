"""`resurgence bridge audit`: which candidate fine-tuning sets would bring an erased concept back.

torch/diffusers are imported inside the command so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from experiments import _validate as check
from experiments._validate import blame, one_line_errors


def _lrs(text: str) -> list[float]:
    """Parse ``"1e-4,3e-4"`` into distinct learning rates > 0."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise check.UsageError(
            f"`--lrs` must be distinct numbers > 0 separated by commas, e.g. '1e-4,3e-4'; got "
            f"{check.quote(text)}."
        )
    return values


@one_line_errors
def audit(
    base: Annotated[Path, typer.Option("--base", help="Base pipeline folder (theta_0).")],
    unlearned: Annotated[
        Path, typer.Option("--unlearned", help="Unlearned pipeline/UNet folder or state dict.")
    ],
    finetune_data: Annotated[
        list[Path],
        typer.Option("--finetune-data", help="Candidate caption folder (repeatable, >= 1)."),
    ],
    forget_prompt: Annotated[
        list[str], typer.Option("--forget-prompt", help="Erased concept prompt (repeatable).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/bridge_audit"),
    lrs: Annotated[str, typer.Option("--lrs", help="GD learning rates, comma-separated.")] = "1e-4",
    steps: Annotated[str, typer.Option("--steps", help="Step counts T, comma-separated.")] = (
        "10,50,100"
    ),
    group: Annotated[
        str, typer.Option("--group", help="Fine-tuned parameter group (must cover the edit).")
    ] = "cross-attn",
    curvature: Annotated[str, typer.Option("--curvature", help="ggn or hessian.")] = "ggn",
    top_k: Annotated[int, typer.Option("--top-k", help="Eigenpairs per candidate.")] = 8,
    krylov_max: Annotated[
        int, typer.Option("--krylov-max", help="Exact Krylov run when max(T) <= this.")
    ] = 64,
    probe_batch: Annotated[int, typer.Option("--probe-batch", help="Samples per batch.")] = 4,
    forget_images: Annotated[
        int, typer.Option("--forget-images", help="Base samples per erased prompt (forget data).")
    ] = 4,
    sample_steps: Annotated[int, typer.Option("--sample-steps", help="DDIM steps.")] = 20,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help="CFG scale.")] = 3.0,
    classifier: Annotated[
        Path | None,
        typer.Option(
            "--classifier",
            help="Testbed concept classifier (state dict, bridge.testbed.classifier): rank the "
            "candidates by predicted presence.",
        ),
    ] = None,
    presence_class: Annotated[
        int | None,
        typer.Option("--presence-class", help="The erased concept's class in --classifier."),
    ] = None,
    presence_seeds: Annotated[
        int, typer.Option("--presence-seeds", help="DDIM seeds of presence (with --classifier).")
    ] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every frozen draw.")] = 0,
    device: Annotated[str, typer.Option("--device", help="torch device.")] = "cpu",
) -> None:
    """Predict, for each candidate fine-tuning set, the erased concept's output_rho and
    forget-loss recovery over an lr x T grid from one curvature measurement each; rank them and
    name the directions responsible (audit.md, audit.png, audit.json in --out).

    With --classifier (the testbed's concept classifier, e.g. RUN/classifier.pt of `bridge demo`)
    and --presence-class, presence is predicted too and ranks the candidates; other classifiers
    go through the Python API (bridge.audit.audit). Every argument is checked before any weights load; a bad one exits with code 2 and one line."""
    lr_list = _lrs(lrs)
    step_list = check.step_list("--steps", steps)
    check.choice("--curvature", curvature, ("ggn", "hessian"))
    for option, value in (
        ("--top-k", top_k),
        ("--probe-batch", probe_batch),
        ("--forget-images", forget_images),
        ("--sample-steps", sample_steps),
        ("--presence-seeds", presence_seeds),
    ):
        check.at_least(option, value, 1)
    check.at_least("--krylov-max", krylov_max, 0)
    if not finetune_data:
        raise check.UsageError("no candidate fine-tuning sets: give at least one --finetune-data.")
    unet_dir = check.unet_folder("--base", base)
    check.unlearned_weights("--unlearned", unlearned)
    for folder in finetune_data:
        check.caption_folder("--finetune-data", folder)
    check.parameter_group("--group", group, unet_dir)
    log_probs = check.testbed_classifier(classifier, presence_class)  # before any weights load

    from bridge.audit import Candidate, audit_markdown, plot_audit
    from bridge.audit import audit as run_audit
    from bridge.data import encode_caption_folder
    from bridge.probes import forget_probes, sampler_probe
    from bridge.sd import load_pipeline
    from bridge.unlearn_io import load_unlearned
    from theory._manifest import write_manifest

    t0 = time.time()
    with blame("--base", base):
        pipe = load_pipeline(base, device=device)
    with blame("--unlearned", unlearned):
        theta_u = load_unlearned(pipe.unet, unlearned).to(device).eval()
    check.nonzero_displacement("--unlearned", unlearned, pipe.unet, theta_u, group)
    dtype = next(pipe.unet.parameters()).dtype
    cands = []
    for folder in finetune_data:
        with blame("--finetune-data", folder):
            latents, captions = encode_caption_folder(base, folder, pipe.unet, device=device,
                                                      dtype=dtype)  # fmt: skip
        cands.append(Candidate(Path(folder).name, latents, tuple(captions)))
    text, sched = pipe.text_encoder, pipe.scheduler
    sampler = sampler_probe(text, forget_prompt[0], scheduler=sched, seeds=range(forget_images),
                            steps=sample_steps, guidance_scale=guidance_scale)  # fmt: skip
    forget = forget_probes(
        text, list(forget_prompt), base=pipe.unet, sampler=sampler,
        alphas_cumprod=sched.alphas_cumprod, batch_size=probe_batch, seed=seed,
    )  # fmt: skip
    presence = {}
    if classifier is not None:
        presence = {
            "sampler": sampler_probe(text, forget_prompt[0], scheduler=sched,
                                     seeds=range(presence_seeds), steps=sample_steps,
                                     guidance_scale=guidance_scale),
            "log_probs": log_probs,
            "concept": presence_class,
        }  # fmt: skip
    report = run_audit(
        pipe.unet, theta_u, text, sched, cands, forget_batches=forget, lrs=lr_list,
        steps=step_list, group=group, curvature=curvature, top_k=top_k, krylov_max=krylov_max,
        probe_batch=probe_batch, seed=seed, progress=True, **presence,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.md").write_text(audit_markdown(report))
    (out / "audit.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    plot_audit(report, out / "audit.png")
    write_manifest(
        out,
        config={"base": str(base), "unlearned": str(unlearned), "forget_prompts": forget_prompt,
                "finetune_data": [str(f) for f in finetune_data], "lrs": lr_list,
                "steps": step_list, "group": group, "curvature": curvature, "top_k": top_k,
                "classifier": None if classifier is None else str(classifier),
                "presence_class": presence_class, "presence_seeds": presence_seeds},
        seeds={"seed": seed},
        wall_time=time.time() - t0,
    )  # fmt: skip
    typer.echo(json.dumps({"ranking": list(report.ranking), "rank_by": report.rank_by}, indent=1))
