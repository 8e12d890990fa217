"""`resurgence theory ...` commands: exact linear-model runs."""

from __future__ import annotations

import typer

theory_app = typer.Typer(
    help="Exact linear diffusion model: fine-tuning, unlearning, sweeps.", no_args_is_help=True
)
