"""Figure 6: resurgence vs learning rate, number of erased concepts and rho_c (s.5.6)."""

from __future__ import annotations

from experiments.figures._style import FigureResult, figure, run_default, save

NAME = "theory_knobs"


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Three panels, each one knob on the x axis, another as the line family."""
    ds = run_default(NAME, runs, config=config, progress=progress)
    rho = ds.rho.isel(steps=-1)
    if "seed" in rho.dims:  # average over random problems: single problems are noisy
        rho = rho.mean("seed")
    t_final = int(ds.steps[-1])
    lr_mid = float(ds.lr.values[len(ds.lr) // 2])
    rc_mid = float(ds.common_component.values[len(ds.common_component) // 2])
    fig, axes = figure(1, 3, height=3.5, sharey=True)
    data = {}
    cmap = __import__("matplotlib").colormaps["viridis"]
    n_values = ds.num_erased.values
    for i, n in enumerate(n_values):
        color = cmap(i / max(len(n_values) - 1, 1))
        curve = rho.sel(num_erased=n, common_component=rc_mid).values
        axes[0].plot(ds.lr.values, curve, marker="o", color=color, label=f"{n} erased")
        data[f"lr/n={n}"] = curve
        curve = rho.sel(num_erased=n, lr=lr_mid).values
        axes[2].plot(
            ds.common_component.values, curve, marker="o", color=color, label=f"{n} erased"
        )
        data[f"rho_c/n={n}"] = curve
    for j, rc in enumerate(ds.common_component.values):
        curve = rho.sel(common_component=rc, lr=lr_mid).values
        axes[1].plot(
            n_values,
            curve,
            marker="o",
            color=cmap(j / max(len(ds.common_component) - 1, 1)),
            label=f"ρ_c={rc:g}",
        )
        data[f"n/rho_c={rc:g}"] = curve
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate η")
    axes[0].set_title(f"ρ_c = {rc_mid:g}", fontsize=10)
    axes[1].set_xlabel("erased concepts")
    axes[1].set_xticks(n_values)
    axes[1].set_title(f"η = {lr_mid:.2g}", fontsize=10)
    axes[2].set_xlabel("common component ρ_c")
    axes[2].set_title(f"η = {lr_mid:.2g}", fontsize=10)
    axes[0].set_ylabel(f"resurgence ρ after T={t_final} GD steps")
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].legend(frameon=False, fontsize=7, ncol=2)
    n_seeds = ds.sizes.get("seed", 1)
    by_lr = rho.sel(common_component=rc_mid).mean("num_erased")
    by_n = rho.sel(lr=lr_mid).mean("common_component")
    by_rc = rho.sel(lr=lr_mid).mean("num_erased")
    fig.suptitle(
        f"Resurgence rises {float(by_lr[-1] / by_lr[0]):.0f}x "
        f"from η={float(ds.lr[0]):g} to {float(ds.lr[-1]):g}; "
        f"erasing {int(n_values[-1])} concepts instead of 1: {float(by_n[-1] - by_n[0]):+.2f};\n"
        f"ρ_c {float(ds.common_component[0]):g} → {float(ds.common_component[-1]):g}: "
        f"{float(by_rc[-1] - by_rc[0]):+.2f}"
        f" (mean of {n_seeds} random problems, T={t_final})",
        y=1.06,
    )
    png, pdf = save(fig, out, NAME)
    data["lr"], data["num_erased"], data["common_component"] = (
        ds.lr.values,
        n_values,
        ds.common_component.values,
    )
    summary = {
        "rise_over_lr": float(by_lr[-1] / by_lr[0]),
        "change_num_erased": float(by_n[-1] - by_n[0]),
        "change_common_component": float(by_rc[-1] - by_rc[0]),
        "random_problems": int(n_seeds),
        "steps": t_final,
    }
    return FigureResult(png, pdf, data, ds, summary)
