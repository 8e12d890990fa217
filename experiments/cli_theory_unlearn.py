"""`resurgence theory unlearn`: unlearn concept(s) in the linear model, fine-tune benignly, report.

Writes ``report.nc`` (xarray, h5netcdf) and ``summary.json`` into ``--out``. Registered in
``experiments/cli_theory.py``; this module does not import it, so it can be used on its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def _int_list(text: str | None, name: str) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "none"):
        return None if text is None else []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"`{name}` must be comma-separated integers; got {text!r}."
        ) from None


def default_retain(num_concepts: int, forget: list[int], finetune: list[int]) -> list[int]:
    """Concepts neither erased nor fine-tuned on: a preserve set that does not pre-empt the test."""
    return [k for k in range(num_concepts) if k not in forget and k not in finetune]


def run_unlearn(
    *,
    method: str,
    forget: list[int],
    finetune: list[int],
    retain: list[int] | None,
    steps: list[int],
    lr: float | None,
    optimizer: str,
    finetune_params: str,
    dim: int,
    embed_dim: int,
    num_concepts: int,
    num_levels: int,
    common_component: float,
    seed: int,
    guidance_scale: float,
    num_samples: int,
):
    """Build the default problem, pretrain in closed form, and return the stage report."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from theory import concept_distribution, make_problem, pretrain_closed_form
    from theory.report import stage_report

    problem = make_problem(
        jax.random.PRNGKey(seed),
        dim=dim,
        embed_dim=embed_dim,
        num_concepts=num_concepts,
        num_levels=num_levels,
        common_component=common_component,
    )
    theta_0 = pretrain_closed_form(
        problem, concept_distribution(problem, np.full(num_concepts, 1.0 / num_concepts))
    )
    bad = [k for k in finetune if not 0 <= k < num_concepts]
    if not finetune or bad:
        raise typer.BadParameter(
            f"`--finetune` needs concept indices in [0, {num_concepts - 1}]; got {finetune}."
        )
    probs = np.zeros(num_concepts)
    probs[finetune] = 1.0 / len(finetune)
    if retain is None:
        retain = default_retain(num_concepts, forget, finetune)
    return stage_report(
        problem,
        theta_0,
        method,
        forget,
        probs,
        lr=lr,
        steps=steps,
        optimizer=optimizer,
        finetune_params=finetune_params,
        retain=retain,
        guidance_scale=guidance_scale,
        key=jax.random.PRNGKey(seed + 1),
        num_samples=num_samples,
    )


def summarize(report) -> dict:
    """JSON-ready headline numbers: presence per stage, rho at the last step."""
    others = [k for k in range(report.self_presence.shape[1]) if k not in report.forget]
    return {
        "method": report.method,
        "forget": list(report.forget),
        "retain": list(report.retain),
        "optimizer": report.optimizer,
        "lr": report.lr,
        "stages": list(report.stage_labels),
        "presence": {lab: report.presence[i].tolist() for i, lab in enumerate(report.stage_labels)},
        # Largest change of any non-erased concept's own presence caused by unlearning.
        "others_presence_change_max": float(
            max(
                (abs(report.self_presence[1, k] - report.self_presence[0, k]) for k in others),
                default=0.0,
            )
        ),
        "rho": dict(
            zip(map(str, report.finetune_steps.tolist()), report.rho.tolist(), strict=True)
        ),
        "predicted_rho": dict(
            zip(
                map(str, report.finetune_steps.tolist()), report.predicted_rho.tolist(), strict=True
            )
        ),
        "curvature_along_delta": report.curvature_along_delta,
    }


def unlearn_command(
    method: str = typer.Option(
        "uce",
        "--method",
        help="Unlearning preset (uce, mace, esd_x, esd_u, sdd, salun, scissorhands, erasediff).",
    ),
    forget: list[int] = typer.Option(
        [0], "--forget", help="Concept to erase; repeat for mass erasure."
    ),
    finetune: str = typer.Option(
        "1,2,3", "--finetune", help="Comma-separated fine-tuning concepts (uniform)."
    ),
    retain: str | None = typer.Option(
        None,
        "--retain",
        help="Comma-separated preserve set; default: concepts neither erased nor fine-tuned; 'none' for empty.",
    ),
    steps: str = typer.Option(
        "0,10,100,1000",
        "--steps",
        help="Comma-separated fine-tuning step counts to report (or one number).",
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Fine-tuning step size; default 1/lambda_max (GD) or 1e-3 (Adam)."
    ),
    optimizer: str = typer.Option("gd", "--optimizer", help="gd (exact) or adam (simulated)."),
    finetune_params: str = typer.Option("all", "--finetune-params", help="all or v_only."),
    dim: int = typer.Option(16, "--dim", help="Image dimension d."),
    embed_dim: int = typer.Option(8, "--embed-dim", help="Embedding dimension m (>= K + 1)."),
    num_concepts: int = typer.Option(6, "--num-concepts", help="Number of concepts K."),
    num_levels: int = typer.Option(10, "--num-levels", help="Noise levels L."),
    common_component: float = typer.Option(
        0.3, "--common-component", help="Pairwise embedding cosine rho_c."
    ),
    guidance_scale: float = typer.Option(
        1.0, "--guidance-scale", help="Classifier-free guidance scale."
    ),
    num_samples: int = typer.Option(
        4096, "--num-samples", help="Monte-Carlo samples for presence."
    ),
    out: Path = typer.Option(Path("runs/theory_unlearn"), "--out", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Problem seed (presence key = seed + 1)."),
) -> None:
    """Unlearn, fine-tune benignly, and write presence per stage (report.nc + summary.json)."""
    start = time.time()
    step_list = _int_list(steps, "steps") or []
    if len(step_list) == 1 and step_list[0] > 0:  # one number N: report 0, N/100, N/10, N
        step_list = sorted({0, step_list[0] // 100, step_list[0] // 10, step_list[0]})
    try:
        report = run_unlearn(
            method=method,
            forget=list(forget),
            finetune=_int_list(finetune, "finetune") or [],
            retain=_int_list(retain, "retain"),
            steps=step_list,
            lr=lr,
            optimizer=optimizer,
            finetune_params=finetune_params,
            dim=dim,
            embed_dim=embed_dim,
            num_concepts=num_concepts,
            num_levels=num_levels,
            common_component=common_component,
            seed=seed,
            guidance_scale=guidance_scale,
            num_samples=num_samples,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    from theory._atomic import atomic_write, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    ds = report.to_xarray()
    ds.attrs.update(
        {
            "seed": seed,
            "dim": dim,
            "embed_dim": embed_dim,
            "num_concepts": num_concepts,
            "num_levels": num_levels,
            "common_component": common_component,
        }
    )
    atomic_write(out / "report.nc", lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))
    summary = summarize(report) | {"seed": seed, "wall_time_s": round(time.time() - start, 2)}
    atomic_write_json(out / "summary.json", summary)
    typer.echo(json.dumps({k: summary[k] for k in ("method", "presence", "rho")}, indent=1))
