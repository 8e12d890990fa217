"""Results of the testbed demo: the JSON summary and the labelled xarray Dataset (netCDF)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["summarise", "to_xarray"]


def summarise(cfg, results, stage_presence, accuracy, steps) -> dict[str, Any]:
    """JSON summary: presence per stage and method, (predicted, measured) rho pairs, correlation."""
    pairs = []  # (method, lr, step, predicted, measured)
    per_method = {}
    for method, r in results["methods"].items():
        pred = np.asarray(r["predict"]["predicted_rho"])  # (lr, step)
        negative = np.asarray(r["predict"]["negative_dominated"], dtype=bool)  # (lr, step)
        for i, lr in enumerate(r["predict"]["lrs"]):
            hist = {h["step"]: h for h in r["gd"][f"{i}"]}
            for j, t in enumerate(steps):
                if t > 0 and t in hist:
                    pairs.append(
                        (
                            method,
                            float(cfg.gd_lr_fractions[i]),
                            float(lr),
                            int(t),
                            float(pred[i, j]),
                            float(hist[t]["rho"]),
                            bool(negative[i, j]),
                        )
                    )
        final = r["adamw"][-1]
        gd_last = r["gd"][str(len(r["predict"]["lrs"]) - 1)][-1]  # largest lr, last step
        per_method[method] = {
            "presence_before": stage_presence["base"]["presence"],
            "presence_unlearned": stage_presence[method]["presence"],
            "presence_finetuned": final.get("presence"),
            "presence_finetuned_peak": max(h.get("presence") or 0.0 for h in r["adamw"]),
            "presence_gd_finetuned": gd_last.get("presence"),
            "incidental_presence_gd_finetuned": gd_last.get("incidental_presence"),
            "gd_rho_final": gd_last.get("rho"),
            "gd_forget_loss_recovery_final": gd_last.get("forget_loss_recovery"),
            "incidental_presence_before": stage_presence["base"]["incidental_presence"],
            "incidental_presence_unlearned": stage_presence[method]["incidental_presence"],
            "incidental_presence_finetuned": final.get("incidental_presence"),
            "adamw_rho_final": final.get("rho"),
            "adamw_forget_loss_recovery_final": final.get("forget_loss_recovery"),
            "adamw_history": r["adamw"],
            "gd_history": r["gd"],
            "eigenvalues": r["predict"]["eigenvalues"],
            "curvature_along_delta": r["predict"]["curvature_along_delta"],
        }
    p = np.array([x[4] for x in pairs])
    m = np.array([x[5] for x in pairs])
    ok = np.array([not x[6] for x in pairs], dtype=bool)
    corr_ok = (
        float(np.corrcoef(p[ok], m[ok])[0, 1])
        if ok.sum() > 2 and p[ok].std() > 0 and m[ok].std() > 0
        else float("nan")
    )
    corr = (
        float(np.corrcoef(p, m)[0, 1])
        if len(pairs) > 2 and p.std() > 0 and m.std() > 0
        else float("nan")
    )
    final_t = max(steps)
    fin = [(x[4], x[5]) for x in pairs if x[3] == final_t]
    corr_final = float(np.corrcoef(*zip(*fin, strict=True))[0, 1]) if len(fin) > 2 else float("nan")
    return {
        "erase": cfg.erase,
        "finetune_concepts": list(cfg.finetune_concepts),
        "classifier_heldout_accuracy": accuracy,
        "base_presence": stage_presence["base"],
        "methods": per_method,
        "rho_pairs": [
            dict(
                zip(
                    (
                        "method",
                        "lr_fraction",
                        "lr",
                        "step",
                        "predicted_rho",
                        "rho",
                        "negative_dominated",
                    ),
                    x,
                    strict=True,
                )
            )
            for x in pairs
        ],
        "rho_correlation": corr,
        "rho_correlation_final_step": corr_final,
        # the law on the local quadratic model; where negative-curvature terms dominate it
        # extrapolates a geometric growth that the real (non-quadratic) loss does not follow
        "rho_correlation_positive_curvature": corr_ok,
        "rho_pairs_negative_dominated": int((~ok).sum()),
        "rho_median_ratio": float(np.median(m[ok] / p[ok])) if ok.any() else float("nan"),
        "rho_mean_abs_error": float(np.mean(np.abs(p - m))) if len(pairs) else float("nan"),
    }


def to_xarray(cfg, results, steps, summary):
    """Labelled results, dims ``method``, ``lr_fraction``, ``step``, ``adamw_step``, ``stage``."""
    import xarray as xr

    methods = list(results["methods"])
    lrs = list(cfg.gd_lr_fractions)
    lr_values = np.array([results["methods"][m]["predict"]["lrs"] for m in methods], float)
    pred = np.full((len(methods), len(lrs), len(steps)), np.nan)
    rho = np.full_like(pred, np.nan)
    rec = np.full_like(pred, np.nan)
    for a, method in enumerate(methods):
        r = results["methods"][method]
        pred[a] = np.asarray(r["predict"]["predicted_rho"])
        for b in range(len(lrs)):
            hist = {h["step"]: h for h in r["gd"][f"{b}"]}
            for c, t in enumerate(steps):
                if t in hist:
                    rho[a, b, c] = hist[t].get("rho", np.nan)
                    rec[a, b, c] = hist[t].get("forget_loss_recovery", np.nan)
    ad_steps = [h["step"] for h in results["methods"][methods[0]]["adamw"]]
    keys = ("rho", "forget_loss_recovery", "presence", "incidental_presence")
    adamw = {k: np.full((len(methods), len(ad_steps)), np.nan) for k in keys}
    for a, method in enumerate(methods):
        for c, h in enumerate(results["methods"][method]["adamw"]):
            for k in keys:
                v = h.get(k)
                adamw[k][a, c] = np.nan if v is None else v
    stages = ["before", "unlearned", "gd_finetuned", "finetuned"]
    pres = np.array(
        [[summary["methods"][m][f"presence_{s}"] for s in stages] for m in methods], float
    )
    inc = np.array(
        [[summary["methods"][m][f"incidental_presence_{s}"] for s in stages] for m in methods],
        float,
    )
    ds = xr.Dataset(
        {
            "lr": (("method", "lr_fraction"), lr_values),
            "predicted_rho": (("method", "lr_fraction", "step"), pred),
            "rho": (("method", "lr_fraction", "step"), rho),
            "forget_loss_recovery": (("method", "lr_fraction", "step"), rec),
            "adamw_rho": (("method", "adamw_step"), adamw["rho"]),
            "adamw_forget_loss_recovery": (("method", "adamw_step"), adamw["forget_loss_recovery"]),
            "adamw_presence": (("method", "adamw_step"), adamw["presence"]),
            "adamw_incidental_presence": (("method", "adamw_step"), adamw["incidental_presence"]),
            "presence": (("method", "stage"), pres),
            "incidental_presence": (("method", "stage"), inc),
        },
        coords={
            "method": methods,
            "lr_fraction": lrs,
            "step": steps,
            "adamw_step": ad_steps,
            "stage": stages,
        },
        attrs={
            "erase": cfg.erase,
            "classifier_heldout_accuracy": summary["classifier_heldout_accuracy"],
            "rho_correlation": summary["rho_correlation"],
        },
    )
    ds["step"].attrs["units"] = "full-batch GD steps"
    ds["adamw_step"].attrs["units"] = "AdamW steps"
    return ds
