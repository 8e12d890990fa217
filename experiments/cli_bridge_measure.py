"""`resurgence bridge measure`: curvature and subspaces of an unlearned UNet, and predicted rho(T).

torch/diffusers are imported inside the command so that `resurgence --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from experiments import _validate as check
from experiments._validate import UsageError, blame, one_line_errors

DTYPES = ("float32", "float64", "float16", "bfloat16")


def _text_folder(base: Path, given: Path | None) -> Path:
    """The pipeline folder whose text_encoder/ and tokenizer/ encode the prompts."""
    candidates = [given] if given else [base, base.parent]
    for folder in candidates:
        if all((folder / sub).is_dir() for sub in ("text_encoder", "tokenizer")):
            return folder
    if given:
        raise UsageError(
            f"`--text-encoder` {check.quote(given)} has no text_encoder/ and tokenizer/ folders; "
            "give the pipeline folder that holds them."
        )
    raise UsageError(
        f"`--text-encoder` not given, and neither `--base` {check.quote(base)} nor its parent has "
        "text_encoder/ and tokenizer/; pass --text-encoder PIPELINE_FOLDER."
    )


def _save(result, out: Path, *, args: dict, seed: int, wall_time: float) -> None:
    """Write ``measurement.nc`` (h5netcdf), ``manifest.json`` and ``spectrum.png``, atomically."""
    from bridge.measure import plot_spectrum
    from theory._atomic import atomic_write
    from theory._manifest import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    dataset = result.to_xarray()
    atomic_write(out / "measurement.nc", lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"))
    plot_spectrum(result, out / "spectrum.png")
    write_manifest(
        out, config=args, seeds={"seed": seed}, wall_time=wall_time, extra={"scalars": result.scalars}
    )


@one_line_errors
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
            "--verify/--no-verify",
            help="Also run GD on the frozen loss and report the measured readouts.",
        ),
    ] = False,
    krylov_depth: Annotated[
        int | None,
        typer.Option(
            "--krylov-depth",
            help="Lanczos steps at the fine-tuning gradient for the exact Krylov prediction "
            "(needs >= the largest --steps; default: no Krylov prediction).",
        ),
    ] = None,
) -> None:
    """Measure curvature/subspaces at the unlearned UNet and predict resurgence (theory.md s.4).

    Every argument is checked before any weights load; a bad one exits with code 2 and one line.
    """
    if (finetune_prompts is None) == (finetune_data is None):
        given = "both" if finetune_prompts is not None else "neither"
        raise UsageError(
            f"give exactly one of `--finetune-prompts` FILE or `--finetune-data` DIR; got {given}."
        )
    check.choice("--dtype", dtype, DTYPES)
    step_list = check.step_list("--steps", steps)
    check.positive("--lr", lr)
    check.at_least("--top-k", top_k, 1)
    check.at_least("--batch-size", batch_size, 1)
    check.at_least("--subspace-rank", subspace_rank, 1)
    if krylov_depth is not None and krylov_depth < max(step_list):
        raise UsageError(
            f"`--krylov-depth` {krylov_depth} Lanczos steps predict exactly only T <= "
            f"{krylov_depth}, but the largest `--steps` is {max(step_list)}; use "
            f"--krylov-depth >= {max(step_list)}."
        )
    start = time.time()
    import torch

    from bridge.curvature import HVP_METHODS

    check.choice("--hvp-method", hvp_method, HVP_METHODS)
    unet_dir = check.unet_folder("--base", base)
    check.unlearned_weights("--unlearned", unlearned)
    text_folder = _text_folder(Path(base), text_encoder)
    if finetune_prompts is not None:
        prompts = check.prompt_file("--finetune-prompts", finetune_prompts)
    else:
        check.caption_folder("--finetune-data", finetune_data)
    group = check.parameter_group("--params", params, unet_dir)
    if not 2 * top_k < group.numel:  # both ends of the spectrum, disjoint (bridge.spectra)
        raise UsageError(
            f"`--top-k` must satisfy 2 x top-k < n = {group.numel}, the size of `--params` "
            f"{check.quote(params)}; got {top_k}. Use --top-k <= {(group.numel - 1) // 2} or a "
            "larger group."
        )

    from bridge.data import encode_caption_folder
    from bridge.loading import load_unet, load_unlearned_unet
    from bridge.measure import measure_resurgence, summary
    from bridge.sd import load_text_encoder

    torch_dtype = getattr(torch, dtype)
    with blame("--base", base):
        base_unet = load_unet(base, device=device, dtype=torch_dtype)
    with blame("--unlearned", unlearned):
        unlearned_unet = load_unlearned_unet(
            base_unet, unlearned, device=device, dtype=torch_dtype
        )
    check.nonzero_displacement("--unlearned", unlearned, base_unet, unlearned_unet, params)
    latents = None
    if finetune_data is not None:
        with blame("--finetune-data", finetune_data):
            latents, prompts = encode_caption_folder(
                text_folder, finetune_data, base_unet, device=device, dtype=torch_dtype
            )
    # Last: transformers prints a loading bar, and every input error should come before it.
    with blame("--text-encoder", text_folder):
        text = load_text_encoder(text_folder, device=device, dtype=torch_dtype)
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
        krylov_depth=krylov_depth,
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
            "krylov_depth",
        }
    }
    _save(result, out, args=args, seed=seed, wall_time=time.time() - start)
    typer.echo(summary(result))
    typer.echo(f"wrote {out}/measurement.nc, manifest.json, spectrum.png")
