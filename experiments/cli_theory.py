"""`resurgence theory ...` commands: exact linear-model runs.

Each command's implementation lives in its own module; this file only registers them.
"""

from __future__ import annotations

import typer

from experiments.cli_theory_sweep import sweep
from experiments.cli_theory_unlearn import unlearn_command

theory_app = typer.Typer(
    help="Exact linear diffusion model: fine-tuning, unlearning, sweeps.", no_args_is_help=True
)
theory_app.command("sweep")(sweep)
theory_app.command("unlearn")(unlearn_command)
