"""Figure 4: presence before / after unlearning / after fine-tuning per method, and incidental
presence under unrelated prompts (theory.md s.5.4)."""

from __future__ import annotations

import numpy as np

from experiments.figures._style import FigureResult, figure, run_default, save

NAME = "theory_presence"
STAGES = ("before unlearning", "after unlearning", "after fine-tuning")


def make(out="figures", runs="runs/figures", *, config=None, progress=False) -> FigureResult:
    """Bars: presence of the erased concept 0 under its own prompt at the three stages.
    Heatmap: presence of concept 0 under each concept's prompt after fine-tuning."""
    ds = run_default(NAME, runs, config=config, progress=progress)
    methods = [str(m) for m in ds.method.values]
    t_final = int(ds.steps[-1])
    bars = np.stack(
        [
            ds.presence_before.values,
            ds.incidental_presence.sel(stage="unlearned").isel(prompt=0).values,
            ds.presence.isel(steps=-1).values,
        ]
    )  # (3, methods)
    heat = ds.incidental_presence.sel(stage="finetuned").values  # (methods, prompts)

    fig, (ax, ax_h) = figure(1, 2, height=4.2, gridspec_kw={"width_ratios": [1.5, 1]})
    x = np.arange(len(methods))
    width = 0.27
    for i, (stage, color) in enumerate(zip(STAGES, ["0.6", "#1f77b4", "#d62728"], strict=True)):
        ax.bar(x + (i - 1) * width, bars[i], width, label=stage, color=color)
    chance = 1.0 / ds.sizes["prompt"]
    ax.axhline(chance, color="k", lw=0.8, ls=":", label="chance (1/K)")
    ax.set_xticks(x, methods, rotation=40, ha="right")
    ax.set_ylabel("presence of erased concept\n(Bayes-classifier probability)")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, fontsize=8, loc="upper right", ncol=2)
    image = ax_h.imshow(heat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax_h.set_yticks(x, methods)
    ax_h.set_xticks(
        np.arange(heat.shape[1]), ["f (own)"] + [f"c{j}" for j in range(1, heat.shape[1])]
    )
    ax_h.set_xlabel("prompt")
    ax_h.set_title(f"incidental presence of f\nunder each prompt, after T={t_final}", fontsize=10)
    ax_h.grid(False)
    fig.colorbar(image, ax=ax_h, fraction=0.05)
    revived = int(np.sum(bars[2] > bars[1] + 0.1))
    fig.suptitle(
        "Benign fine-tuning on new prompts brings the erased concept back "
        "(presence +0.1 or more)\n"
        f"for {revived} of {len(methods)} unlearning methods",
        y=1.09,
    )
    fig.subplots_adjust(wspace=0.55)
    png, pdf = save(fig, out, NAME)
    summary = {
        "methods_revived": revived,
        "methods": len(methods),
        "presence": {
            m: dict(zip(("before", "unlearned", "finetuned"), map(float, bars[:, i]), strict=True))
            for i, m in enumerate(methods)
        },
    }
    data = {"methods": methods, "bars": bars, "incidental": heat}
    return FigureResult(png, pdf, data, ds, summary)
