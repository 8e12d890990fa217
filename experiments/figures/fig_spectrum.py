"""Figure 5: fine-tuning Hessian spectrum with the spectral weights of delta (s.5.5)."""

from __future__ import annotations

import matplotlib.ticker

from experiments.figures._style import FigureResult, figure, run_default, save

NAME = "theory_spectrum"
_ZERO = 1e-10  # eigenvalues below this (relative to the largest) are the Hessian's null space


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Per rho_c: eigenvalues of the block Hessian (sorted) and <v_i, delta/||delta||>^2 on them."""
    ds = run_default(NAME, runs, config=config, progress=progress)
    values = ds.common_component.values
    fig, axes = figure(1, len(values), height=3.9, squeeze=False)
    data = {}
    for ax, rc in zip(axes[0], values, strict=True):
        lam = ds.hessian_eigenvalues.sel(common_component=rc).values.reshape(-1)
        weight = ds.spectral_weights.sel(common_component=rc).values.reshape(-1)
        null = lam <= _ZERO * lam.max()
        ax.vlines(lam[~null], 0, weight[~null], color="#d62728", lw=2)
        ax.scatter(
            lam[~null], weight[~null], s=14, color="#d62728", zorder=3, label="weight on eigenspace"
        )
        ax.set_xscale("log")
        ax.set_ylim(0, None)
        in_range = float(weight[~null].sum())
        ax.text(
            0.97,
            0.95,
            f"null space of H (λ = 0):\nweight {1 - in_range:.2f}, never recovered",
            transform=ax.transAxes,
            va="top",
            ha="right",
            fontsize=9,
            color="0.3",
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"ρ_c = {rc:g}: weight on range(H) = {in_range:.2f}", fontsize=10)
        ax.set_xlabel("fine-tuning Hessian eigenvalue λ")
        data[float(rc)] = {
            "eigenvalues": lam,
            "spectral_weights": weight,
            "weight_in_range": in_range,
        }
    axes[0][0].set_ylabel("spectral weight ⟨v_i, δ/‖δ‖⟩²")
    first, last = (data[float(v)]["weight_in_range"] for v in (values[0], values[-1]))
    fig.suptitle(
        "Most of the UCE displacement lies in the null space of fine-tuning; "
        "only the part on curved\n"
        f"directions can return (weight on range(H): {first:.2f} at ρ_c={values[0]:g}, "
        f"{last:.2f} at ρ_c={values[-1]:g})",
        y=1.04,
    )
    fig.subplots_adjust(wspace=0.3)
    png, pdf = save(fig, out, NAME)
    summary = {"weight_in_range": {f"{float(v):g}": data[float(v)]["weight_in_range"] for v in values}}
    return FigureResult(png, pdf, data, ds, summary)
