"""The `resurgence` console script: `resurgence theory ...`, `resurgence bridge ...`, `resurgence figures`.

Each command group lives in its own module and is registered here, so that groups can grow
independently. Heavy imports (jax, torch) happen inside the commands, keeping `--help` fast.
"""

from __future__ import annotations

import typer

from experiments.cli_bridge import bridge_app
from experiments.cli_theory import theory_app

app = typer.Typer(
    name="resurgence",
    help=(
        "Concept resurgence in unlearned diffusion models.\n\n"
        "theory: exact linear-model simulations (JAX).  bridge: measurements on real diffusers "
        "UNets (PyTorch).  figures: regenerate every default figure into figures/."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(theory_app, name="theory")
app.add_typer(bridge_app, name="bridge")


@app.command()
def figures(
    out: str = typer.Option("figures", "--out", help="Folder for the PNG and PDF figures."),
    runs: str = typer.Option(
        "runs/figures", "--runs", help="Folder for the sweep results behind the figures."
    ),
    bridge_demo: bool = typer.Option(
        False, "--bridge-demo/--no-bridge-demo", help="Also run the tiny CPU bridge testbed."
    ),
    jobs: int = typer.Option(
        0,
        "--jobs",
        help="Figures made side by side in this many processes (0: one a CPU this process may "
        "use, at most one a figure). The numbers do not depend on it.",
    ),
) -> None:
    """Regenerate every default theory figure (and optionally the bridge testbed figure)."""
    from experiments.figures_main import default_jobs, make_all_figures

    if jobs < 0:
        raise typer.BadParameter(f"must be >= 0, got {jobs}.", param_hint="--jobs")
    make_all_figures(out=out, runs=runs, bridge_demo=bridge_demo, jobs=jobs or default_jobs())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
