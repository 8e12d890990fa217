"""Results of the testbed demo: the long-format prediction table, its metrics, JSON and netCDF.

One row per (method, lr, step, readout) with the predicted and the measured value
(architecture.md "results"), written as ``bridge_testbed_predictions.csv``:

* predicted = the readout evaluated at theta_u + Delta theta_pred(T), Delta theta from the
  Krylov run of the headline local model (the linearised network by default; presence: the
  UNet generates there from the same seeds); measured = the readout after T actual GD steps.

The other predictors of the record (``alternatives``: the law's first-order Delta R by Krylov and
by eigenpairs + closure on the Hessian, the Hessian's model at points) get the same metrics in
``summary["metrics_alternatives"]``.

Step 0 is left out of the table (prediction and measurement coincide there by construction).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TABLE_COLUMNS", "TABLE_READOUTS", "metrics", "prediction_rows", "rows_to_csv",
           "summarise", "to_xarray"]

TABLE_COLUMNS = ("method", "lr_fraction", "lr", "step", "readout", "predicted", "measured")
TABLE_READOUTS = ("presence", "output_rho", "forget_loss_recovery", "rho", "presence_logprob")


def prediction_rows(records: dict[str, dict], readouts: Sequence[str] = TABLE_READOUTS) -> list[dict]:
    """Long-format rows from the per-method records of :func:`predict_and_measure`."""
    rows = []
    for method, rec in records.items():
        for r, (frac, lr) in enumerate(zip(rec["lr_fractions"], rec["lrs"], strict=True)):
            for s, step in enumerate(rec["steps"]):
                if step == 0:
                    continue
                for name in readouts:
                    pred = rec["predicted"][name][r][s]
                    rows.append(
                        dict(zip(TABLE_COLUMNS, (method, frac, lr, step, name, pred,
                                                 rec["measured"][name][r][s]), strict=True))
                    )
    return rows


def rows_to_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV text (header :data:`TABLE_COLUMNS`, floats with 10 significant digits)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for row in rows:
        writer.writerow(
            [f"{row[c]:.10g}" if isinstance(row[c], float) else row[c] for c in TABLE_COLUMNS]
        )
    return out.getvalue()


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _stats(rows) -> dict[str, float]:
    p = np.array([r["predicted"] for r in rows], float)
    m = np.array([r["measured"] for r in rows], float)
    return {
        "n": len(rows),
        "spearman": _spearman(p, m),
        "median_abs_error": float(np.median(np.abs(p - m))) if len(rows) else float("nan"),
        "max_abs_error": float(np.max(np.abs(p - m))) if len(rows) else float("nan"),
    }


def metrics(rows: Sequence[dict]) -> dict[str, dict]:
    """Per readout: pooled and per-method Spearman, median and max |predicted - measured|."""
    out = {}
    for name in dict.fromkeys(r["readout"] for r in rows):
        mine = [r for r in rows if r["readout"] == name]
        out[name] = {
            "pooled": _stats(mine),
            "per_method": {
                m: _stats([r for r in mine if r["method"] == m])
                for m in dict.fromkeys(r["method"] for r in mine)
            },
        }
    return out


def summarise(cfg, records, stage_presence, accuracy, adamw) -> dict[str, Any]:
    """JSON summary: presence per stage and method, the prediction table, its metrics."""
    rows = prediction_rows(records)
    per_method = {}
    for method, rec in records.items():
        final = adamw[method][-1]
        measured_presence = rec["measured"]["presence"]
        per_method[method] = {
            "presence_before": stage_presence["base"]["presence"],
            "presence_unlearned": stage_presence[method]["presence"],
            "presence_gd_finetuned": measured_presence[-1][-1],  # largest lr, last step
            "presence_gd_predicted": rec["predicted_presence"][-1][-1],
            "presence_finetuned": final.get("presence"),
            "presence_finetuned_peak": max(h.get("presence") or 0.0 for h in adamw[method]),
            "incidental_presence_before": stage_presence["base"]["incidental_presence"],
            "incidental_presence_unlearned": stage_presence[method]["incidental_presence"],
            "incidental_presence_finetuned": final.get("incidental_presence"),
            "adamw_rho_final": final.get("rho"),
            "adamw_forget_loss_recovery_final": final.get("forget_loss_recovery"),
            "adamw_history": adamw[method],
            "prediction": rec,
        }
    first = next(iter(records.values()))
    alternatives = {
        key: metrics(
            prediction_rows(
                {m: {**rec, "predicted": rec["alternatives"][key]} for m, rec in records.items()}
            )
        )
        for key in first["alternatives"]
    }
    return {
        "erase": cfg.erase,
        "finetune_concepts": list(cfg.finetune_concepts),
        "classifier_heldout_accuracy": accuracy,
        "base_presence": stage_presence["base"],
        "methods": per_method,
        "predictions": rows,
        "predictor": first["predictor"],
        "metrics": metrics(rows),
        "metrics_alternatives": alternatives,
    }


def to_xarray(cfg, summary):
    """Labelled results, dims ``method``, ``readout``, ``lr_fraction``, ``step``, ``stage``..."""
    import xarray as xr

    methods = list(summary["methods"])
    recs = [summary["methods"][m]["prediction"] for m in methods]
    names = list(recs[0]["readouts"])
    steps = recs[0]["steps"]

    def grid(key):
        return np.array([[rec[key][n] for n in names] for rec in recs], float)

    ad_steps = [h["step"] for h in summary["methods"][methods[0]]["adamw_history"]]
    keys = ("rho", "forget_loss_recovery", "presence", "incidental_presence")
    adamw = {k: np.full((len(methods), len(ad_steps)), np.nan) for k in keys}
    for a, m in enumerate(methods):
        for c, h in enumerate(summary["methods"][m]["adamw_history"]):
            for k in keys:
                adamw[k][a, c] = np.nan if h.get(k) is None else h[k]
    stages = ["before", "unlearned", "gd_finetuned", "finetuned"]
    stage = {
        k: np.array(
            [[summary["methods"][m][f"{k}_{s}"] or np.nan for s in stages] for m in methods], float
        )
        for k in ("presence",)
    }
    dims = ("method", "readout", "lr_fraction", "step")
    alternatives = {
        f"predicted_{key}": (
            dims,
            np.array([[rec["alternatives"][key][n] for n in names] for rec in recs], float),
        )
        for key in recs[0]["alternatives"]
    }
    ds = xr.Dataset(
        {
            "lr": (("method", "lr_fraction"), np.array([rec["lrs"] for rec in recs], float)),
            "predicted": (dims, grid("predicted")),
            "measured": (dims, grid("measured")),
            **alternatives,
            **{f"adamw_{k}": (("method", "adamw_step"), v) for k, v in adamw.items()},
            "presence": (("method", "stage"), stage["presence"]),
        },
        coords={
            "method": methods,
            "readout": names,
            "lr_fraction": list(cfg.gd_lr_fractions),
            "step": steps,
            "adamw_step": ad_steps,
            "stage": stages,
        },
        attrs={
            "erase": cfg.erase,
            "classifier_heldout_accuracy": summary["classifier_heldout_accuracy"],
            "presence_spearman_pooled": summary["metrics"]["presence"]["pooled"]["spearman"],
        },
    )
    ds["step"].attrs["units"] = "full-batch GD steps"
    ds["adamw_step"].attrs["units"] = "AdamW steps"
    ds["predicted"].attrs["predictor"] = summary["predictor"]
    return ds
