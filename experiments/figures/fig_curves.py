"""Figure 2: resurgence curves over fine-tuning steps per unlearning method, GD vs Adam (s.5.2)."""

from __future__ import annotations

import numpy as np

from experiments.figures._style import METHOD_COLORS, FigureResult, figure, run_default, save

NAME = "theory_curves"


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """rho(T) per method; left GD (exact closed form, larger lr), right Adam (optax, smaller lr)."""
    ds = run_default(NAME, runs, config=config, progress=progress)
    lrs = np.sort(ds.lr.values)
    panels = [("gd_closed_form", float(lrs[-1]), "full-batch GD"), ("adam", float(lrs[0]), "Adam")]
    steps = ds.steps.values
    fig, axes = figure(1, 2, height=3.9, sharey=True)
    data = {"steps": steps}
    for ax, (opt, lr, label) in zip(axes, panels, strict=True):
        for method in ds.method.values:
            curve = ds.rho.sel({"method": method, "optimizer": opt, "lr": lr}).values
            data[f"{opt}/{method}"] = curve
            dashed = str(method) in ("mace", "esd_u")  # UCE/MACE and ESD-x/-u can coincide
            ax.plot(
                steps,
                curve,
                marker="o",
                ms=2.5,
                lw=1.6,
                ls="--" if dashed else "-",
                color=METHOD_COLORS.get(str(method)),
                label=str(method),
            )
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("fine-tuning steps T")
        ax.set_title(f"{label}, lr = {lr:g}")
    axes[0].set_ylabel("resurgence ρ (0 unlearned, 1 undone)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, -0.13)
    )
    gd_final = ds.rho.sel({"optimizer": "gd_closed_form", "lr": panels[0][1]}).isel(steps=-1)
    best = str(gd_final.method.values[int(np.argmax(gd_final.values))])
    revived = int((gd_final > 0.05).sum())
    fig.suptitle(
        f"Fine-tuning on new prompts partly undoes {revived} of {gd_final.size} unlearning methods "
        f"(GD: up to ρ = {float(gd_final.max()):.2f}, {best});\nAdam gets there in tens of steps",
        y=1.04,
    )
    png, pdf = save(fig, out, NAME)
    adam_final = ds.rho.sel({"optimizer": "adam", "lr": panels[1][1]}).isel(steps=-1)
    summary = {
        "methods_revived_gd": revived,
        "methods": int(gd_final.size),
        "max_rho_gd": float(gd_final.max()),
        "max_rho_gd_method": best,
        "final_rho_gd": {str(m): float(v) for m, v in zip(gd_final.method.values, gd_final.values, strict=True)},
        "final_rho_adam": {str(m): float(v) for m, v in zip(adam_final.method.values, adam_final.values, strict=True)},
    }
    return FigureResult(png, pdf, data, ds, summary)
