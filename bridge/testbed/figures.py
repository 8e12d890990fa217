"""Figures of the testbed: presence per stage and along fine-tuning; predicted vs measured rho."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_presence", "plot_rho"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_presence(summary: dict[str, Any], path: str | Path) -> Path:
    """Bars before / after unlearning / after fine-tuning per method, and presence along steps."""
    plt = _plt()
    methods = list(summary["methods"])
    fig, (ax, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.4))
    stages = [
        ("before", "before unlearning"),
        ("unlearned", "after unlearning"),
        ("gd_finetuned", "after GD on cross-attn K/V (lr 0.9 x 2/lambda_max, final step)"),
        ("finetuned", "after AdamW on whole UNet (final step)"),
    ]
    width = 0.8 / len(stages)
    x = np.arange(len(methods))
    for i, (key, label) in enumerate(stages):
        vals = [summary["methods"][m][f"presence_{key}"] or 0.0 for m in methods]
        bars = ax.bar(x + (i - 1.5) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, methods)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel(f"presence of {summary['erase']!r}\n(classifier probability, mean of 32 seeds)")
    ax.set_xlabel("unlearning method")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Presence under the erased prompt", fontsize=10)
    base = summary["base_presence"]["presence"]
    for axis, key, xlabel, title in (
        (
            ax1,
            "gd",
            "full-batch GD step (cross-attn K/V only)",
            "Along GD fine-tuning on other concepts",
        ),
        (
            ax2,
            "adamw",
            "AdamW step (whole UNet, minibatches)",
            "Along AdamW fine-tuning on other concepts",
        ),
    ):
        for m in methods:
            if key == "gd":
                runs = summary["methods"][m]["gd_history"]
                hist = [h for h in runs[str(len(runs) - 1)] if h.get("presence") is not None]
            else:
                hist = summary["methods"][m]["adamw_history"]
            steps = [h["step"] for h in hist]
            line = axis.plot(
                steps, [h["presence"] for h in hist], marker="o", label=f"{m}: erased prompt"
            )
            axis.plot(
                steps,
                [h["incidental_presence"] for h in hist],
                ls="--",
                color=line[0].get_color(),
                label=f"{m}: other prompts (incidental)",
            )
        axis.axhline(base, color="k", lw=0.8, ls=":", label="base model, erased prompt")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"presence of {summary['erase']!r}")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=6.5)
        axis.set_title(title, fontsize=10)
    rise = {
        m: (summary["methods"][m]["presence_gd_finetuned"] or 0)
        - summary["methods"][m]["presence_unlearned"]
        for m in methods
    }
    best = max(rise, key=rise.get)
    fig.suptitle(
        f"Erased {summary['erase']!r} comes back under fine-tuning on "
        f"{len(summary['finetune_concepts'])} other concepts: presence +{rise[best]:.2f} "
        f"({best}, GD on K/V)"
        if rise[best] > 0
        else f"Erased {summary['erase']!r} under fine-tuning on other concepts: no rise in presence"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_rho(summary: dict[str, Any], path: str | Path) -> Path:
    """Predicted (theory law, measured curvature) vs measured rho over methods, lrs and steps."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    pairs = summary["rho_pairs"]
    methods = list(summary["methods"])
    fracs = sorted({p["lr_fraction"] for p in pairs})
    markers = ["o", "s", "^", "D", "v"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    t_max = max(q["step"] for q in pairs)
    for p in pairs:
        c = colours[methods.index(p["method"]) % len(colours)]
        ax.scatter(
            p["predicted_rho"],
            p["rho"],
            marker=markers[fracs.index(p["lr_fraction"]) % len(markers)],
            facecolors="none" if p["negative_dominated"] else c,
            edgecolors=c,
            s=15 + 35 * p["step"] / t_max,
            alpha=0.85,
        )
    ok = [p for p in pairs if not p["negative_dominated"]]
    vals = [p["predicted_rho"] for p in ok] + [p["rho"] for p in pairs] + [0.0]
    lo, hi = min(vals), max(vals)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    for m in methods:
        ax.scatter([], [], color=colours[methods.index(m) % len(colours)], label=m)
    for f in fracs:
        ax.scatter(
            [],
            [],
            color="gray",
            marker=markers[fracs.index(f) % len(markers)],
            label=f"lr = {f:g} x 2/lambda_max",
        )
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="negative curvature dominates")
    ax.set_xlabel("predicted rho (theory law from top-k eigenpairs at theta_u), symlog")
    ax.set_ylabel("measured rho (full-batch GD on cross-attn K/V), symlog")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(
        f"Pearson r = {summary['rho_correlation']:.2f} over all {len(pairs)} (method, lr, T); "
        f"r = {summary['rho_correlation_positive_curvature']:.2f} over the "
        f"{len(pairs) - summary['rho_pairs_negative_dominated']} not dominated by\nnegative "
        f"curvature; median measured/predicted there = {summary['rho_median_ratio']:.2f}; "
        "marker size ~ step T (10..40)",
        fontsize=8,
    )
    for m in methods:
        hist = summary["methods"][m]["adamw_history"]
        ax2.plot([h["step"] for h in hist], [h["rho"] for h in hist], marker="o", label=m)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xlabel("AdamW fine-tuning step (whole UNet, other concepts)")
    ax2.set_ylabel("rho over cross-attn K/V (0 = unlearned, 1 = undone)")
    ax2.legend(fontsize=8)
    ax2.set_title("rho along realistic fine-tuning (AdamW, whole UNet)", fontsize=9)
    fig.suptitle("Parameter-space resurgence rho: predicted from measured curvature vs measured")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
