"""`resurgence bridge measure`: curvature and subspaces of an unlearned UNet, and predicted rho(T).

torch/diffusers are imported inside the command so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _steps(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise typer.BadParameter(
            f"`--steps` must be comma-separated integers, got {text!r}"
        ) from err
    if not values or min(values) < 0:
        raise typer.BadParameter(f"`--steps` needs step counts >= 0, got {text!r}")
    return values


def _text_folder(base: Path, given: Path | None) -> Path:
    candidates = [given] if given else [base, base.parent]
    for folder in candidates:
        if folder is not None and (folder / "text_encoder").is_dir():
            return folder
    raise typer.BadParameter(
        f"no text_encoder/ + tokenizer/ found in {' or '.join(str(c) for c in candidates)}; "
        "pass --text-encoder PIPELINE_FOLDER"
    )


def measure(
    base: Annotated[
        Path, typer.Option("--base", help="Base UNet folder or SD pipeline folder (local).")
    ],
    unlearned: Annotated[
        Path,
        typer.Option(
            "--unlearned", help="Unlearned UNet/pipeline folder, or a (partial) state dict file."
        ),
    ],
    forget_prompt: Annotated[
        list[str],
        typer.Option("--forget-prompt", help="Prompt of the erased concept (repeatable)."),
    ],
    finetune_prompts: Annotated[
        Path | None,
        typer.Option(
            "--finetune-prompts",
            help="Text file, one benign fine-tuning prompt per line "
            "(in-distribution: targets are the base model's own predictions).",
        ),
    ] = None,
    finetune_data: Annotated[
        Path | None,
        typer.Option(
            "--finetune-data",
            help="Folder of images + same-stem .txt captions. Encoded by the "
            "pipeline's vae/ if present; without a VAE (tiny testbed) images are the latents.",
        ),
    ] = None,
    params: Annotated[
        str,
        typer.Option(
            "--params",
            help="Parameter group: cross-attn-kv, "
            "cross-attn, attn, all, or a regex over parameter names.",
        ),
    ] = "cross-attn-kv",
    top_k: Annotated[int, typer.Option("--top-k", help="Eigenpairs per end of the spectrum.")] = 20,
    lr: Annotated[
        float, typer.Option("--lr", help="GD step size of the predicted fine-tuning.")
    ] = 1e-5,
    steps: Annotated[
        str, typer.Option("--steps", help="Comma-separated step counts T.")
    ] = "1,10,100,1000",
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path(
        "runs/bridge_measure"
    ),
    device: Annotated[
        str, typer.Option("--device", help="torch device (cpu, cuda, cuda:1).")
    ] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help=f"One of {', '.join(DTYPES)}.")] = "float32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of every frozen draw.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per probe batch.")] = 4,
    subspace_rank: Annotated[
        int, typer.Option("--subspace-rank", help="Fine-tuning gradient subspace rank.")
    ] = 4,
    hvp_method: Annotated[
        str,
        typer.Option(
            "--hvp-method", help="double-backward, forward-over-reverse, finite-difference."
        ),
    ] = "double-backward",
    text_encoder: Annotated[
        Path | None,
        typer.Option(
            "--text-encoder",
            help="Pipeline folder with text_encoder/ and tokenizer/ "
            "(default: --base or its parent).",
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="Also run GD on the frozen loss and report measured rho."
        ),
    ] = False,
) -> None:
    """Measure curvature/subspaces at the unlearned UNet and predict resurgence (theory.md s.4)."""
    if (finetune_prompts is None) == (finetune_data is None):
        raise typer.BadParameter(
            "give exactly one of --finetune-prompts FILE or --finetune-data DIR"
        )
    if dtype not in DTYPES:
        raise typer.BadParameter(f"`--dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    step_list = _steps(steps)
    start = time.time()
    import torch

    from bridge.data import encode_caption_folder
    from bridge.loading import load_unet, load_unlearned_unet
    from bridge.measure import measure_resurgence, summary
    from bridge.tiny import load_text_encoder

    torch_dtype = getattr(torch, dtype)
    base_unet = load_unet(base, device=device, dtype=torch_dtype)
    unlearned_unet = load_unlearned_unet(base_unet, unlearned, device=device, dtype=torch_dtype)
    text_folder = _text_folder(Path(base), text_encoder)
    text = load_text_encoder(text_folder, device=device, dtype=torch_dtype)
    latents = None
    if finetune_prompts is not None:
        if not finetune_prompts.is_file():
            raise typer.BadParameter(f"--finetune-prompts file does not exist: {finetune_prompts}")
        prompts = [ln.strip() for ln in finetune_prompts.read_text().splitlines() if ln.strip()]
    else:
        try:
            latents, prompts = encode_caption_folder(
                text_folder, finetune_data, base_unet, device=device, dtype=torch_dtype
            )
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    result = measure_resurgence(
        base_unet,
        unlearned_unet,
        text,
        forget_prompts=list(forget_prompt),
        finetune_prompts=prompts,
        finetune_latents=latents,
        params=params,
        top_k=top_k,
        lr=lr,
        steps=step_list,
        seed=seed,
        batch_size=batch_size,
        subspace_rank=subspace_rank,
        hvp_method=hvp_method,
        verify=verify,
        progress=True,
    )
    args = {
        k: str(v)
        for k, v in locals().items()
        if k
        in {
            "base",
            "unlearned",
            "forget_prompt",
            "finetune_prompts",
            "finetune_data",
            "params",
            "top_k",
            "lr",
            "steps",
            "out",
            "device",
            "dtype",
            "seed",
            "batch_size",
            "subspace_rank",
            "hvp_method",
            "text_encoder",
            "verify",
        }
    }
    result.save(out, args=args, seed=seed, wall_time=time.time() - start)
    typer.echo(summary(result))
    typer.echo(f"wrote {out}/measurement.nc, manifest.json, spectrum.png")
