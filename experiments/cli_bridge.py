"""`resurgence bridge ...` commands: measurements and experiments on diffusers UNets.

Each command's implementation lives in its own module; this file only registers them.
"""

from __future__ import annotations

import typer

bridge_app = typer.Typer(
    help="Real diffusers UNets: measure curvature/subspaces, unlearn, fine-tune, demo.",
    no_args_is_help=True,
)

# --- measure (curvature and subspaces) -------------------------------------------------------
# (registered by experiments/cli_bridge_measure.py)
from experiments.cli_bridge_measure import measure  # noqa: E402

bridge_app.command("measure")(measure)

# --- unlearn / finetune / demo (testbed) -----------------------------------------------------
# (registered by experiments/cli_bridge_testbed.py)
from experiments.cli_bridge_testbed import demo, finetune, unlearn  # noqa: E402

bridge_app.command("unlearn")(unlearn)
bridge_app.command("finetune")(finetune)
bridge_app.command("demo")(demo)
