"""The resurgence law's predictions on the real-image testbed, beside measured fine-tuning.

For one task and unlearning run of the experiment (:mod:`bridge.realworld.experiment`; its
cached unlearned UNet and fine-tuning sets are reused when ``out`` is an experiment folder run
with the same settings),
each similarity bin's fine-tuning set gets one curvature measurement at theta_u, from which the
law predicts presence (generated at the predicted parameters, :func:`bridge.predict.
predict_at_points`), ``output_rho`` and forget-loss recovery for every learning rate and step;
full-batch GD on the same frozen loss, group and seeds is then run and measured
(:func:`bridge.testbed.predict.predict_and_measure`, the tiny testbed's pipeline, unchanged).
GD on the cross-attention is the law's own setting; the experiment's LoRA / full AdamW runs
are a different optimiser, so they are not what the law is compared with here.

Layout (a rerun skips finished bins)::

    out/predict/<task>/<method>_<config>/<bin>.json   one bin: predicted and measured readouts
    out/predict/<task>/<method>_<config>/summary.json pooled agreement, per bin
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from theory._atomic import atomic_write_json

__all__ = [
    "PredictSettings",
    "check_request",
    "plot_predictions",
    "predict_realworld",
    "summarise_predictions",
]


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """Knobs of the prediction run (defaults: the tiny testbed demo's, scaled to this UNet)."""

    group: str = "cross-attn"
    lr_fractions: tuple[float, ...] = (0.3, 0.6, 0.9)
    gd_steps: int = 20
    top_k: int = 4
    probe_batch: int = 16
    presence_seeds: int = 16
    forget_images: int = 16
    curvature: str = "ggn"

    def __post_init__(self) -> None:
        for name in ("gd_steps", "top_k", "probe_batch", "presence_seeds", "forget_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        object.__setattr__(self, "lr_fractions", tuple(self.lr_fractions))
        if not self.lr_fractions or any(not 0 < f < 1 for f in self.lr_fractions):
            raise ValueError(
                f"`lr_fractions` must lie in (0, 1) (of 2/lambda_max), got {self.lr_fractions}."
            )
        if self.curvature not in ("ggn", "hessian"):
            raise ValueError(f"`curvature` must be 'ggn' or 'hessian', got {self.curvature!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), lr_fractions=list(self.lr_fractions))


def check_request(cfg, task: str, method: str) -> None:
    """Refuse a task or method that the experiment config does not run (before any work).

    Raises:
      ValueError: naming the config's tasks or methods.
    """
    if task not in cfg.tasks:
        raise ValueError(f"task {task!r} is not in the config's tasks {list(cfg.tasks)}.")
    if method not in cfg.methods:
        raise ValueError(f"method {method!r} is not in the config's methods {list(cfg.methods)}.")


def _forget_batches(model, prompt: str, n: int, cfg, seed: int):
    """Probe batches of the erased prompt's images sampled from the base model (theta_0)."""
    from bridge.loss import make_probe_batches
    from bridge.realworld.pipeline import sample_finetune_set

    images, _ = sample_finetune_set(model.unet, model.text, model.scheduler,
                                    [(prompt, 50_000 + i) for i in range(n)],
                                    steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)  # fmt: skip
    cond = model.text.encode_prompts([prompt])
    return make_probe_batches(images, cond, model.scheduler.alphas_cumprod, batch_size=n,
                              seed=seed + 303)  # fmt: skip


def predict_realworld(
    model,
    cfg,
    out_dir,
    *,
    task: str,
    method: str = "uce",
    settings: PredictSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predicted vs measured readouts for every similarity bin of one task and method.

    Args:
      model: the base :class:`~bridge.realworld.bundle.RealWorldModel`.
      cfg: the :class:`~bridge.realworld.experiment.ExperimentConfig` (protocol, unlearning
        options, sampling); its first unlearning config of ``method`` is used.
      out_dir: the run folder (an experiment folder run with the same settings lends its
        unlearned UNet and fine-tuning sets; one run with other settings is refused).
      task: a concept task of the config (the style task has no concept classifier class).
      method: the unlearning method. settings: :class:`PredictSettings`. progress: bars.

    Returns:
      The summary (also written to ``summary.json``): per bin the predicted and measured
      presence over (lr, T), pooled Spearman and median absolute error.

    Raises:
      ValueError: a task not in the config or the world, a style task, a method the config
        does not unlearn with, or a folder that holds units run with other settings.
    """
    from bridge.realworld.evaluate import task_target
    from bridge.realworld.experiment import (
        _check_resume,
        _finetune_set,
        _slug,
        _unlearned,
        check_tasks,
    )
    from bridge.testbed.predict import predict_and_measure, presence_seeds, step_grid

    settings = settings or PredictSettings()
    check_request(cfg, task, method)
    torch.set_num_threads(cfg.threads)
    the_task = check_tasks(cfg, model.world)[task]
    kind, concept = task_target(the_task, model.world.concepts, model.world.styles)
    if kind != "concept":
        raise ValueError(
            f"task {task!r} is a style task: presence predictions need a concept class."
        )
    label, options = cfg.unlearning_configs(method)[0]
    out = Path(out_dir)
    folder = out / "predict" / _slug(task) / f"{_slug(method)}_{_slug(label)}"
    folder.mkdir(parents=True, exist_ok=True)
    _check_resume(out, cfg)  # the cached unlearned UNet and sets must be this config's
    protocol = cfg.protocol()
    bins = protocol.bins(the_task, model.text.similarity)
    erased = the_task.erased[0]
    unlearned = _unlearned(model, the_task, method, label, options, cfg, out)
    forget = _forget_batches(model, erased, settings.forget_images, cfg, cfg.seed)
    steps = step_grid(settings.gd_steps)
    t0 = time.time()
    records = {}
    for bin_ in tqdm(bins, desc=f"predict {task}/{method}", disable=not progress):
        path = folder / f"{bin_.label}.json"
        if not path.is_file():
            data = _finetune_set(model, the_task, bin_, protocol, cfg, out)
            rec = predict_and_measure(
                model.unet, unlearned, model.text, model.scheduler, model.presence,
                method=method, erase=erased, concept=concept, captions=list(data["captions"]),
                images=data["images"], forget_batches=forget, group=settings.group,
                lr_fractions=settings.lr_fractions, steps=steps, top_k=settings.top_k,
                probe_batch=settings.probe_batch,
                seeds=presence_seeds(settings.presence_seeds),
                sample_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                curvature=settings.curvature, progress=False,
            )  # fmt: skip
            rec["bin"] = {"label": bin_.label, "concepts": list(bin_.concepts),
                          "low": bin_.low, "high": bin_.high}  # fmt: skip
            atomic_write_json(path, rec)
        records[bin_.label] = json.loads(path.read_text())
    summary = summarise_predictions(records)
    summary.update(task=task, method=method, config=label, erased_prompt=erased,
                   settings=settings.to_dict(), wall_time_s=round(time.time() - t0, 1))  # fmt: skip
    atomic_write_json(folder / "summary.json", summary)
    return summary


def summarise_predictions(records: dict[str, dict]) -> dict[str, Any]:
    """Pooled agreement of predicted and measured presence (and output_rho) over bins x lr x T.

    Step 0 (theta_u itself, equal by construction) is left out of the pooled statistics.
    """
    from scipy.stats import spearmanr

    per_bin, pooled = {}, {"presence": ([], []), "output_rho": ([], [])}
    for label, rec in records.items():
        row = {"concepts": rec["bin"]["concepts"], "lrs": rec["lrs"], "steps": rec["steps"],
               "presence_unlearned": rec["values_unlearned"].get("presence")}  # fmt: skip
        for name in pooled:
            if name not in rec["predicted"]:
                continue
            pred = np.asarray(rec["predicted"][name])[:, 1:]
            meas = np.asarray(rec["measured"][name])[:, 1:]
            pooled[name][0].extend(pred.ravel().tolist())
            pooled[name][1].extend(meas.ravel().tolist())
            row[f"{name}_predicted_final"] = pred[:, -1].tolist()
            row[f"{name}_measured_final"] = meas[:, -1].tolist()
        per_bin[label] = row
    out: dict[str, Any] = {"bins": per_bin}
    for name, (pred, meas) in pooled.items():
        if len(pred) < 2:
            continue
        p, m = np.asarray(pred), np.asarray(meas)
        rho = spearmanr(p, m).statistic
        out[name] = {
            "points": len(p),
            "spearman": None if np.isnan(rho) else float(rho),
            "median_abs_error": float(np.median(np.abs(p - m))),
            "max_abs_error": float(np.max(np.abs(p - m))),
        }
    return out


def plot_predictions(folders, path) -> Path:
    """Predicted vs measured readouts, one panel a readout, every (task, bin, lr, T > 0).

    Args:
      folders: prediction folders (``out/predict/<task>/<method>_<config>``), one per task.
      path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readouts = (("presence", "presence of the erased concept (classifier)"),
                ("output_rho", "output_rho (erased prompt's denoiser output)"))  # fmt: skip
    runs = []  # (task index, summary, {bin: record}): each file read once for both panels
    for folder in map(Path, folders):
        summary = json.loads((folder / "summary.json").read_text())
        recs = {b: json.loads((folder / f"{b}.json").read_text()) for b in summary["bins"]}
        runs.append((len(runs), summary, recs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    markers = "osD^v"
    colours = plt.cm.viridis(np.linspace(0.0, 0.85, 4))
    for ax, (name, label) in zip(axes, readouts, strict=True):
        lo, hi, pooled = np.inf, -np.inf, ([], [])
        for t, summary, recs in runs:
            for b, (bin_label, row) in enumerate(summary["bins"].items()):
                rec = recs[bin_label]
                pred = np.asarray(rec["predicted"][name])[:, 1:].ravel()
                meas = np.asarray(rec["measured"][name])[:, 1:].ravel()
                pooled[0].extend(pred)
                pooled[1].extend(meas)
                lo, hi = min(lo, pred.min(), meas.min()), max(hi, pred.max(), meas.max())
                names = ", ".join(row["concepts"][:2]) + (
                    ", ..." if len(row["concepts"]) > 2 else ""
                )
                tag = f"{summary['task']}, {bin_label} ({names})"
                ax.scatter(meas, pred, s=28, marker=markers[t % len(markers)],
                           color=colours[b % len(colours)], alpha=0.85, label=tag)  # fmt: skip
        pad = 0.05 * max(hi - lo, 1e-3)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls="--",
                label="predicted = measured")  # fmt: skip
        err = np.median(np.abs(np.asarray(pooled[0]) - np.asarray(pooled[1])))
        ax.set_title(f"{name}: median |predicted - measured| = {err:.3g}", fontsize=11)
        ax.set_xlabel(f"measured after GD: {label}")
        ax.set_ylabel("predicted by the law (one curvature measurement)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    methods = sorted({summary["method"] for _, summary, _ in runs})
    fig.suptitle(
        f"Real-image testbed, {'/'.join(m.upper() for m in methods)}-unlearned UNet: the law's "
        "prediction vs full-batch GD on the cross-attention\n(one point per bin x lr x T > 0; "
        "colour: MiniLM-similarity bin to the erased concept, dark = least similar)",
        fontsize=11,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
