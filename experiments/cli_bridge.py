"""`resurgence bridge ...` commands: measurements and experiments on diffusers UNets.

Each command's implementation lives in its own module; this file only registers them.
"""

from __future__ import annotations

import typer

from experiments.cli_bridge_audit import audit
from experiments.cli_bridge_measure import measure
from experiments.cli_bridge_realworld import realworld_app
from experiments.cli_bridge_testbed import demo, finetune
from experiments.cli_bridge_unlearn import unlearn

bridge_app = typer.Typer(
    help="Real diffusers UNets: measure curvature/subspaces, unlearn, fine-tune, demo.",
    no_args_is_help=True,
)
bridge_app.command("measure")(measure)  # curvature and subspaces -> predicted rho
bridge_app.command("unlearn")(unlearn)  # the seven methods (bridge.unlearning) on a UNet folder
bridge_app.command("finetune")(finetune)  # benign fine-tuning with resurgence tracking
bridge_app.command("audit")(audit)  # which candidate fine-tuning sets would revive the concept
bridge_app.command("demo")(demo)  # the tiny CPU testbed end to end
bridge_app.add_typer(realworld_app, name="realworld")  # the real-image testbed (OpenMoji, MiniLM)
