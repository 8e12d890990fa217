"""Figures of the real-image resurgence experiment: presence curves and a sample grid.

Both read only the run folder of :func:`bridge.realworld.experiment.run_experiment`
(``results.csv`` and ``samples/``), so they can be redrawn without rerunning anything.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from bridge.realworld.table import ResultsTable, step_of

__all__ = ["plot_resurgence_curves", "plot_sample_grid"]


#: How a figure title names each prompt group.
_GROUP_WORDS = {
    "erased": "its own prompts",
    "synonyms": "its synonyms' prompts",
    "others": "other concepts' prompts",
}


def _series(table: ResultsTable, prompts: str = "erased", metric: str = "presence"):
    base, unlearned, curves = {}, {}, defaultdict(list)
    for r in table.rows:
        if r["prompts"] != prompts or r["metric"] != metric:
            continue
        v = float(r["value"])
        if r["type"] == "base":
            base[r["task"]] = v
        elif r["type"] == "unlearned":
            unlearned[(r["task"], r["algo"], r["config"])] = v
        else:
            key = (r["task"], r["algo"], r["config"], r["finetune_algo"], r["finetune_set"])
            curves[key].append((step_of(r["type"]), v))
    return base, unlearned, {k: sorted(v) for k, v in curves.items()}


def plot_resurgence_curves(table: ResultsTable, path, *, prompts: str = "erased") -> Path:
    """Presence of the erased concept along fine-tuning: one panel per task x unlearning run.

    Lines: one colour per similarity bin (dark = least similar to the erased concept), LoRA
    solid, full fine-tuning dashed; dotted: the base model; grey band: after unlearning.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, unlearned, curves = _series(table, prompts)
    tasks = list(dict.fromkeys(k[0] for k in unlearned))
    runs = list(dict.fromkeys(k[1:] for k in unlearned))
    if not tasks:
        raise ValueError("the table has no unlearned rows: nothing to plot.")
    bins = sorted({k[4] for k in curves}, key=lambda b: int(b.removeprefix("bin")))
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(
        len(runs), len(tasks), figsize=(max(3.4 * len(tasks), 8.0), 2.6 * len(runs) + 1.4),
        squeeze=False, sharex=True, sharey=True,
    )
    for j, task in enumerate(tasks):
        for i, run in enumerate(runs):
            ax = axes[i, j]
            if (task,) + run not in unlearned:
                ax.set_axis_off()
                continue
            if task in base:
                ax.axhline(base[task], color="k", ls=":", lw=1.2, label="base model")
            ax.axhline(unlearned[(task,) + run], color="0.6", lw=3, alpha=0.5, label="unlearned")
            for b, label in enumerate(bins):
                colour = cmap(b / max(len(bins) - 1, 1) * 0.9)
                for algo, ls in (("lora", "-"), ("full", "--")):
                    pts = curves.get((task,) + run + (algo, label))
                    if pts:
                        ax.plot(*zip(*pts, strict=True), ls=ls, color=colour, lw=1.5,
                                label=f"{label} {algo}" if j == 0 and i == 0 else None)
            ax.set_ylim(-0.02, 1.02)
            if i == 0:
                ax.set_title(task, fontsize=11)
            if j == 0:
                ax.set_ylabel(f"{run[0]} ({run[1]})\npresence (prob.)", fontsize=9)
            if i == len(runs) - 1:
                ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               frameon=False)
    fig.suptitle(
        f"Presence of the erased concept under {_GROUP_WORDS.get(prompts, prompts)} during "
        "benign fine-tuning\n"
        "(real-image testbed; bins: MiniLM similarity of the fine-tuning concepts, bin0 least similar)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tile(images: torch.Tensor, n: int = 4) -> torch.Tensor:
    """``n`` images as a 2-column tile in [0, 1], ``(H, W, 3)``."""
    images = ((images[:n].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    cols = 2
    rows = [torch.cat(list(images[r * cols : (r + 1) * cols]), dim=1) for r in range(n // cols)]
    return torch.cat(rows, dim=0)


def _largest_returns(run_dir: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """``{(task slug, run slug): (fine-tuning unit, recovery)}``: per unlearning run, the
    fine-tuning run (recipe x bin) whose last checkpoint has the most erased-concept presence."""
    from bridge.realworld.claims import recoveries
    from bridge.realworld.experiment import _slug

    best: dict[tuple[str, str], tuple[str, float]] = {}
    table = ResultsTable.read_csv(run_dir / "results.csv")
    for (task, algo, config, ft, fset), (_, _, rec) in recoveries(table).items():
        key = (_slug(task), f"{_slug(algo)}_{_slug(config)}")
        if key not in best or rec > best[key][1]:
            best[key] = (f"{ft}_{fset}", rec)
    return best


def plot_sample_grid(run_dir, path, *, finetune: str = "largest", n: int = 4) -> Path:
    """Erased-prompt samples: base, then per unlearning run the unlearned and fine-tuned model.

    The fine-tuned column is the last checkpoint of, with ``finetune="largest"`` (default), the
    fine-tuning run (recipe x bin, named under the cell) that brought the most presence back;
    with ``"lora"`` or ``"full"``, that recipe on the MOST similar bin. The same seeds in every
    column, so a column-to-column change is the model's own.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    samples = run_dir / "samples"
    files = {p.stem: p for p in samples.glob("*.pt")}
    tasks = sorted({s.split("__")[0] for s in files})
    runs = sorted({s.split("__")[1] for s in files if s.count("__") == 2 and not s.endswith("base")})
    if not tasks:
        raise ValueError(f"no samples in {samples}: run the experiment first.")
    if finetune not in ("largest", "lora", "full"):
        raise ValueError(f"`finetune` must be 'largest', 'lora' or 'full', got {finetune!r}.")
    largest = _largest_returns(run_dir) if finetune == "largest" else {}
    kind_label = "fine-tuned" if finetune == "largest" else finetune
    columns = [("base", None)] + [(r, kind) for r in runs for kind in ("unlearned", kind_label)]
    fig, axes = plt.subplots(
        len(tasks), len(columns), figsize=(1.55 * len(columns), 1.85 * len(tasks) + 0.9),
        squeeze=False,
    )
    for i, task in enumerate(tasks):
        last_bin = sorted(
            (s.split("__")[2] for s in files if s.startswith(f"{task}__") and f"__{finetune}_bin" in s),
            key=lambda b: int(b.rsplit("bin", 1)[1]),
        )
        for j, (run, kind) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if kind is None:
                stem = f"{task}__base"
            elif kind == "unlearned":
                stem = f"{task}__{run}__unlearned"
            elif finetune == "largest":
                unit, rec = largest.get((task, run), ("", 0.0))
                stem = f"{task}__{run}__{unit}"
                if stem in files:
                    ax.set_xlabel(f"{unit.replace('_', ' ')}: {rec:+.2f}", fontsize=7, labelpad=2)
            else:
                stem = f"{task}__{run}__{last_bin[-1]}" if last_bin else ""
            if stem in files:
                ax.imshow(_tile(torch.load(files[stem], weights_only=True), n).numpy(),
                          interpolation="nearest")
            else:
                ax.set_axis_off()  # this task was not unlearned with this run
            if i == 0:
                title = "base" if kind is None else f"{run.replace('_', ' ')}\n{kind}"
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(task.replace("_", " "), fontsize=9)
    which = (
        "the last checkpoint of the fine-tuning run (recipe, bin: presence regained) that "
        "brought the most back"
        if finetune == "largest"
        else f"benign {finetune} fine-tuning on the most similar bin"
    )
    fig.suptitle(
        f"Samples of the erased prompt (same seeds): base, after unlearning, and after {which}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
