"""`resurgence theory ...` commands: exact linear-model runs."""

from __future__ import annotations

import typer

theory_app = typer.Typer(
    help="Exact linear diffusion model: fine-tuning, unlearning, sweeps.", no_args_is_help=True
)
from experiments.cli_theory_sweep import sweep as _sweep; theory_app.command("sweep")(_sweep)  # noqa: E402, E702

from experiments.cli_theory_unlearn import unlearn_command as _unlearn; theory_app.command("unlearn")(_unlearn)  # noqa: E402, E702
