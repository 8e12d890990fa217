"""Figure 3: truncated closure rho_k vs simulated rho over random configurations (s.5.3)."""

from __future__ import annotations

import numpy as np

from experiments.figures._style import FigureResult, figure, run_default, save

NAME = "theory_closure"


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Left: rho_k against optax-simulated rho (last T) for a few k. Right: error vs k."""
    ds = run_default(NAME, runs, config=config, progress=progress)
    t_final = int(ds.steps[-1])
    sim = ds.rho.isel(steps=-1).values  # (seed,)
    trunc = ds.predicted_rho_truncated.isel(steps=-1).transpose("rank", ...).values  # (rank, seed)
    full = ds.predicted_rho.isel(steps=-1).values
    ranks = ds["rank"].values
    err_k = np.median(np.abs(trunc - sim[None]), axis=1)
    err_full = float(np.median(np.abs(full - sim)))

    fig, (ax, ax_err) = figure(1, 2, height=3.9)
    shown = [ranks[0], ranks[len(ranks) // 2], ranks[-1]]
    colors = ["#d62728", "#ff7f0e", "#1f77b4"]
    lim = [min(sim.min(), trunc.min()) - 0.05, max(sim.max(), trunc.max()) + 0.05]
    ax.plot(lim, lim, color="0.4", lw=1, ls="--")
    for k, c in zip(shown, colors, strict=True):
        ax.scatter(sim, trunc[list(ranks).index(k)], s=9, alpha=0.6, color=c, label=f"k = {k}")
    ax.set_xlabel(f"simulated ρ (optax GD, T = {t_final})")
    ax.set_ylabel("predicted ρ_k (top-k eigenspaces + closure)")
    ax.legend(frameon=False, loc="upper left")
    ax.set_title(f"{sim.size} random problems")
    ax_err.plot(ranks, err_k, marker="o", color="#1f77b4", label="truncated closure ρ_k")
    ax_err.axhline(
        err_full, color="0.3", ls=":", label=f"full law (all eigenpairs): {err_full:.0e}"
    )
    ax_err.set_ylim(0, None)
    ax_err.set_xlabel("k (Hessian eigenspaces kept)")
    ax_err.set_ylabel("median |ρ_k − ρ|")
    ax_err.legend(frameon=False)
    ax_err.set_title("error vs k")
    good = ranks[np.argmax(err_k < 0.01)] if np.any(err_k < 0.01) else None
    fig.suptitle(
        f"ρ_k converges to the simulated ρ as k grows (median error {err_k[0]:.2f} at k={ranks[0]}"
        + (f", < 0.01 from k={good} of {ranks[-1]})" if good is not None else ")")
        + "\nthe top of the spectrum is not enough: δ's overlap sits in low-curvature eigenspaces",
        y=1.05,
    )
    png, pdf = save(fig, out, NAME)
    data = {
        "rho": sim,
        "predicted_rho_truncated": trunc,
        "predicted_rho": full,
        "ranks": ranks,
        "median_error": err_k,
    }
    summary = {
        "problems": int(sim.size),
        "median_error_by_rank": {str(int(k)): float(e) for k, e in zip(ranks, err_k, strict=True)},
        "median_error_full_law": err_full,
        "first_rank_below_0.01": None if good is None else int(good),
    }
    return FigureResult(png, pdf, data, ds, summary)
