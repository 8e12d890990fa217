"""`resurgence bridge ...` commands: measurements and experiments on diffusers UNets."""

from __future__ import annotations

import typer

bridge_app = typer.Typer(
    help="Real diffusers UNets: measure curvature/subspaces, unlearn, fine-tune, demo.",
    no_args_is_help=True,
)
