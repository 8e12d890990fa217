"""`resurgence theory sweep CONFIG.toml --out DIR`: run a resumable, vmapped theory sweep."""

from __future__ import annotations

from pathlib import Path

import typer


def sweep(
    config: Path = typer.Argument(  # noqa: B008 (typer reads options from defaults)
        ..., help="Sweep config (TOML); see experiments/configs/theory_*.toml."
    ),
    out: Path = typer.Option(  # noqa: B008
        ..., "--out", help="Output folder: results.nc, manifest.json, chunks/."
    ),
    set_: list[str] = typer.Option(  # noqa: B008
        [],
        "--set",
        help="Override KEY=VALUE (TOML value), e.g. --set lr=0.1 --set axes.seed='{range=[0,10]}'.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Discard a run of a different config found in --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run CONFIG over its grid (one compiled, vmapped function per size group and code variant:
    method x optimizer x erased count; each problem prepared once for all its learning rates;
    all JAX devices).

    An interrupted run restarted with the same command continues from its finished chunks.
    """
    import jax

    from experiments.config import ConfigError, load_config
    from experiments.sweep import RESULTS_NAME, enable_compilation_cache, run_sweep

    jax.config.update("jax_enable_x64", True)
    enable_compilation_cache()
    try:
        cfg = load_config(config, set_)
        ds = run_sweep(cfg, out, force=force, progress=progress)
    except ConfigError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=2) from None
    dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
    typer.echo(f"Wrote {out / RESULTS_NAME} ({dims}) and {out / 'manifest.json'}.")
