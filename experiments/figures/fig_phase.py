"""Figure 1: phase diagram of resurgence over overlap angle x curvature (theory.md s.5.1)."""

from __future__ import annotations

import numpy as np

from experiments.figures._style import FigureResult, figure, run_default, save

NAME = "theory_phase"


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Simulated rho(T) (optax GD) as colour, the closed-form law as contours.

    Axes: overlap angle between the erased direction r = M^-1 c_f and the fine-tuning prompt
    (degrees); curvature = squared norm of that prompt (its Hessian block scales with it).
    """
    ds = run_default(NAME, runs, config=config, progress=progress)
    t_final = int(ds.steps[-1])
    sim = ds.rho.isel(steps=-1).transpose("curvature", "overlap_angle").values
    law = ds.predicted_rho.isel(steps=-1).transpose("curvature", "overlap_angle").values
    angle_deg = np.degrees(ds.overlap_angle.values)
    curvature = ds.curvature.values
    lr = float(ds.attrs.get("param_lr", 0.5))
    stable = (lr * ds.lambda_max.transpose("curvature", "overlap_angle").values) < 2.0

    fig, ax = figure(height=4.4)
    mesh = ax.pcolormesh(
        angle_deg,
        curvature,
        np.where(stable, sim, np.nan),
        shading="nearest",
        cmap="magma",
        vmin=0.0,
        vmax=1.0,
    )
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    contours = ax.contour(angle_deg, curvature, law, levels=levels, colors="white", linewidths=1.2)
    ax.clabel(contours, fmt="%.2f", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("overlap angle between erased direction r and fine-tuning prompt (degrees)")
    ax.set_ylabel("curvature: ||c_ft||² (Hessian scale)")
    fig.colorbar(mesh, ax=ax, label=f"simulated resurgence ρ after T={t_final} GD steps")
    ax.set_title(
        "Resurgence needs both overlap and curvature: "
        "ρ→0 as the angle→90°, and rises with curvature\n"
        "(colour: optax GD simulation; white contours: closed-form law)"
    )
    ax.grid(False)
    png, pdf = save(fig, out, NAME)
    data = {
        "angle_deg": angle_deg,
        "curvature": curvature,
        "rho": sim,
        "predicted_rho": law,
        "stable": stable,
    }
    summary = {
        "steps": t_final,
        "max_rho": float(np.nanmax(np.where(stable, sim, np.nan))),
        "max_abs_rho_at_90_degrees": float(np.max(np.abs(sim[:, -1]))),
        "max_abs_law_minus_simulation": float(np.nanmax(np.abs(np.where(stable, law - sim, np.nan)))),
    }
    return FigureResult(png, pdf, data, ds, summary)
