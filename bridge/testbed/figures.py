"""Figures of the testbed: predicted vs measured presence (the headline), presence per stage,
and predicted vs measured rho / output_rho."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from theory._atomic import atomic_write

__all__ = ["plot_presence", "plot_presence_prediction", "plot_readouts"]

_MARKERS = ["o", "s", "^", "D", "v"]
_STYLES = [":", "--", "-", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130))
    _plt().close(fig)
    return path


def _colours(methods):
    cycle = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def _scatter_readout(ax, summary, readout, label):
    """Predicted vs measured ``readout`` per method, y = x, Spearman per method and pooled."""
    rows = [r for r in summary["predictions"] if r["readout"] == readout]
    methods = list(summary["methods"])
    colour = _colours(methods)
    stats = summary["metrics"][readout]
    fracs = sorted({r["lr_fraction"] for r in rows})
    t_max = max(r["step"] for r in rows)
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        s = stats["per_method"][m]
        ax.scatter([], [], color=colour[m], marker=_MARKERS[methods.index(m) % 5],
                   label=f"{m}: Spearman {s['spearman']:.2f}, median |err| {s['median_abs_error']:.3f}")
        for r in mine:
            ax.scatter(r["predicted"], r["measured"], color=colour[m], alpha=0.85,
                       marker=_MARKERS[methods.index(m) % 5], s=14 + 40 * r["step"] / t_max,
                       edgecolors="k" if r["lr_fraction"] == fracs[-1] else "none", linewidths=0.5)
    vals = [r["predicted"] for r in rows] + [r["measured"] for r in rows]
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
    ax.set_xlabel(f"predicted {label}")
    ax.set_ylabel(f"measured {readout} (full-batch GD)")
    p = stats["pooled"]
    ax.set_title(
        f"{readout}: pooled Spearman {p['spearman']:.2f}, median |err| {p['median_abs_error']:.3f}"
        f" over {p['n']} (method, lr, T)\nmarker size ~ T; black edge = largest lr "
        f"({fracs[-1]:g} x 2/lambda_max)", fontsize=8.5)
    ax.legend(fontsize=7, loc="upper left")


def plot_presence_prediction(summary: dict[str, Any], path: str | Path) -> Path:
    """Headline: predicted vs measured presence, and presence along T with the prediction."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    _scatter_readout(ax, summary, "presence", "presence")
    methods = list(summary["methods"])
    colour = _colours(methods)
    fracs = summary["methods"][methods[0]]["prediction"]["lr_fractions"]
    for m in methods:
        rec = summary["methods"][m]["prediction"]
        for r in range(len(rec["lr_fractions"])):
            ax2.plot(rec["steps"], rec["predicted_presence"][r], ls=_STYLES[r % len(_STYLES)],
                     color=colour[m], lw=1.4)
            ax2.plot(rec["steps"], rec["measured"]["presence"][r], ls="none", color=colour[m],
                     marker=_MARKERS[methods.index(m) % 5], ms=4)
    handles = [Line2D([], [], color=colour[m], marker=_MARKERS[i % 5], label=m)
               for i, m in enumerate(methods)]
    handles += [Line2D([], [], color="gray", ls=_STYLES[r % len(_STYLES)],
                       label=f"predicted, lr {f:g} x 2/lambda_max") for r, f in enumerate(fracs)]
    handles += [Line2D([], [], color="gray", ls="none", marker="o", label="measured (GD)"),
                Line2D([], [], color="k", ls=":", lw=0.8, label="base model")]
    ax2.axhline(summary["base_presence"]["presence"], color="k", lw=0.8, ls=":")
    ax2.set_xlabel("full-batch GD steps T on the other concepts")
    ax2.set_ylabel(f"presence of {summary['erase']!r}")
    ax2.set_ylim(0, 1.05)
    ax2.legend(handles=handles, fontsize=7, ncol=2, loc="upper left")
    ax2.set_title("Presence along fine-tuning: prediction (lines), measurement (markers)",
                  fontsize=9)
    model = summary["predictor"].replace("_at_points", "")
    fig.suptitle(
        f"Resurgence of {summary['erase']!r} predicted at theta_u: presence generated at "
        f"theta_u + Delta theta_pred(T)\n({model} local model, Krylov form of the law; one "
        "curvature measurement serves every lr and T)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_readouts(summary: dict[str, Any], path: str | Path) -> Path:
    """Predicted vs measured output_rho and rho (parameter space), per method."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    _scatter_readout(ax, summary, "output_rho", "output_rho (erased prompt's denoiser output)")
    _scatter_readout(ax2, summary, "rho", "rho (parameter space)")
    fig.suptitle("Readouts of resurgence: the law's prediction vs full-batch GD")
    fig.tight_layout()
    return _save(fig, path)


def plot_presence(summary: dict[str, Any], path: str | Path) -> Path:
    """Bars before / after unlearning / after fine-tuning per method, and presence along AdamW."""
    plt = _plt()
    methods = list(summary["methods"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    stages = [
        ("before", "before unlearning"),
        ("unlearned", "after unlearning"),
        ("gd_finetuned", "after GD on cross-attention (largest lr, last step)"),
        ("finetuned", "after AdamW on the whole UNet (last step)"),
    ]
    width = 0.8 / len(stages)
    x = np.arange(len(methods))
    for i, (key, label) in enumerate(stages):
        vals = [summary["methods"][m][f"presence_{key}"] or 0.0 for m in methods]
        bars = ax.bar(x + (i - 1.5) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, methods)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel(f"presence of {summary['erase']!r}\n(classifier probability, mean over seeds)")
    ax.set_xlabel("unlearning method")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Presence under the erased prompt", fontsize=10)
    for m in methods:
        hist = summary["methods"][m]["adamw_history"]
        steps = [h["step"] for h in hist]
        line = ax2.plot(steps, [h["presence"] for h in hist], marker="o", label=f"{m}: erased prompt")
        ax2.plot(steps, [h["incidental_presence"] for h in hist], ls="--",
                 color=line[0].get_color(), label=f"{m}: other prompts (incidental)")
    ax2.axhline(summary["base_presence"]["presence"], color="k", lw=0.8, ls=":",
                label="base model, erased prompt")
    ax2.set_xlabel("AdamW step (whole UNet, minibatches)")
    ax2.set_ylabel(f"presence of {summary['erase']!r}")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=6.5)
    ax2.set_title("Along AdamW fine-tuning on other concepts", fontsize=10)
    rise = {m: (summary["methods"][m]["presence_gd_finetuned"] or 0)
            - summary["methods"][m]["presence_unlearned"] for m in methods}
    best = max(rise, key=rise.get)
    fig.suptitle(
        f"Erased {summary['erase']!r} comes back under fine-tuning on "
        f"{len(summary['finetune_concepts'])} other concepts: presence +{rise[best]:.2f} "
        f"({best}, GD on cross-attention)"
        if rise[best] > 0
        else f"Erased {summary['erase']!r} under fine-tuning on other concepts: no rise in presence"
    )
    fig.tight_layout()
    return _save(fig, path)
