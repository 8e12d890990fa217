"""The paper's six claims, each reproduced or refuted with numbers from a ``results.csv``.

Each claim is computed from the long-format table alone (so anyone can recheck it from the
committed CSV). ``recovery`` of a fine-tuning run is the presence of the erased concept under a
prompt group at the run's last checkpoint minus its presence after unlearning (same seeds):

(a) resurgence after benign fine-tuning: recovery of the erased prompts > 0;
(b) more similar fine-tuning data gives more resurgence: Spearman(bin, recovery) > 0;
(c) LoRA and full fine-tuning give similar resurgence: their mean recoveries are close;
(d) stronger regularisation during unlearning (UCE's ridge lambda) gives more resurgence for
    identities but not for objects;
(e) incidental resurgence: presence of the erased concept under OTHER concepts' prompts rises;
(f) synonyms resurge with the erased prompt: their recoveries are correlated and positive.

The thresholds are stated in each claim's ``rule`` so that a verdict can be argued with.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from scipy import stats

from bridge.realworld.protocol import DEFAULT_TASK_KINDS
from bridge.realworld.table import ResultsTable, step_of

__all__ = ["Claim", "claims", "claims_markdown", "recoveries"]

#: Recovery below this (a presence probability) is within sampling noise of 8 x 4 images.
NOISE = 0.05


class Claim(dict):
    """``{"claim", "verdict", "numbers", "rule"}``; verdict is reproduced / refuted / untested."""


def recoveries(table: ResultsTable, prompts: str = "erased", metric: str = "presence"):
    """``{(task, algo, config, finetune_algo, finetune_set): (unlearned, final, recovery)}``.

    ``final`` is the value at the run's last checkpoint; runs without a fine-tuning row are left
    out.
    """
    unlearned, last = {}, {}
    for r in table.rows:
        if r["prompts"] != prompts or r["metric"] != metric:
            continue
        head = (r["task"], r["algo"], r["config"])
        value = float(r["value"])
        if r["type"] == "unlearned":
            unlearned[head] = value
        step = step_of(r["type"])
        if step is not None:
            key = head + (r["finetune_algo"], r["finetune_set"])
            if key not in last or step > last[key][0]:
                last[key] = (step, value)
    return {
        k: (unlearned[k[:3]], v, v - unlearned[k[:3]])
        for k, (_, v) in last.items()
        if k[:3] in unlearned
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _verdict(tested: bool, holds) -> str:
    """``"untested"`` without data for the claim, else whether its rule holds."""
    if not tested:
        return "untested"
    return "reproduced" if holds else "refuted"


def claims(table: ResultsTable) -> list[Claim]:
    """The six claims of the module docstring, computed from ``table``."""
    rec = recoveries(table)
    out = []
    # (a)
    values = [v[2] for v in rec.values()]
    per = defaultdict(list)
    for k, v in rec.items():
        per[f"{k[0]} / {k[1]}"].append(v[2])
    a_ok = bool(values) and _mean(values) > NOISE
    out.append(
        Claim(
            claim="(a) resurgence after benign fine-tuning",
            verdict=_verdict(bool(values), a_ok),
            numbers={
                "runs": len(values),
                "mean_recovery": _mean(values),
                "runs_above_noise": sum(v > NOISE for v in values),
                "mean_recovery_by_task_method": {k: _mean(v) for k, v in sorted(per.items())},
            },
            rule=f"mean recovery of the erased prompts over all runs > {NOISE}",
        )
    )
    # (b)
    series = defaultdict(list)
    for (task, algo, config, ft, fset), v in rec.items():
        series[(task, algo, config, ft)].append((int(fset.removeprefix("bin")), v[2]))
    rhos = {}
    for key, pts in series.items():
        if len(pts) >= 3 and len({p[1] for p in pts}) > 1:
            pts.sort()
            rhos[" / ".join(key)] = float(stats.spearmanr([p[0] for p in pts], [p[1] for p in pts])[0])
    b_mean = _mean(rhos.values())
    out.append(
        Claim(
            claim="(b) more similar fine-tuning data gives more resurgence",
            verdict=_verdict(bool(rhos), b_mean > 0.3),
            numbers={
                "mean_spearman_bin_vs_recovery": b_mean,
                "positive": sum(r > 0 for r in rhos.values()),
                "series": len(rhos),
                "spearman": rhos,
            },
            rule="mean Spearman(similarity bin, recovery) over task x method x recipe > 0.3",
        )
    )
    # (c)
    pairs = []
    for (task, algo, config, ft, fset), v in rec.items():
        if ft == "lora" and (task, algo, config, "full", fset) in rec:
            pairs.append((v[2], rec[(task, algo, config, "full", fset)][2]))
    lora, full = _mean(p[0] for p in pairs), _mean(p[1] for p in pairs)
    similar = pairs and (
        max(abs(lora), abs(full)) < NOISE or (min(lora, full) > 0 and max(lora, full) <= 2 * min(lora, full))
    )
    out.append(
        Claim(
            claim="(c) LoRA and full fine-tuning give similar resurgence",
            verdict=_verdict(bool(pairs), similar),
            numbers={
                "paired_runs": len(pairs),
                "mean_recovery_lora": lora,
                "mean_recovery_full": full,
                "pearson": float(stats.pearsonr(*zip(*pairs, strict=True))[0]) if len(pairs) > 2 else math.nan,
            },
            rule=f"both mean recoveries < {NOISE}, or the larger is at most twice the smaller",
        )
    )
    # (d)
    kinds = DEFAULT_TASK_KINDS
    lam_rec = defaultdict(dict)  # task -> {(recipe, bin): {lambda: recovery}}
    for (task, algo, config, ft, fset), v in rec.items():
        if algo == "uce" and config.startswith("lam="):
            lam_rec[task].setdefault((ft, fset), {})[float(config[4:])] = v[2]
    effect = {}
    for task, runs in lam_rec.items():
        # paired: the same recipe and bin under the largest and the smallest lambda
        diffs = [r[max(r)] - r[min(r)] for r in runs.values() if len(r) >= 2]
        if diffs:
            effect[task] = _mean(diffs)
    ident = [effect[t] for t in effect if kinds.get(t) == "identity"]
    objs = [effect[t] for t in effect if kinds.get(t) == "object"]
    d_ok = ident and objs and _mean(ident) > NOISE and _mean(objs) <= _mean(ident) / 2
    out.append(
        Claim(
            claim="(d) stronger unlearning regularisation: more resurgence for identities, not objects",
            verdict=_verdict(bool(ident and objs), d_ok),
            numbers={
                "recovery_high_minus_low_lambda": effect,
                "identity": _mean(ident),
                "object": _mean(objs),
            },
            rule=(
                "UCE recovery with the largest minus the smallest lambda (same recipe and bin): "
                f"identity effect > {NOISE} and object effect at most half of it"
            ),
        )
    )
    # (e)
    inc = recoveries(table, prompts="others")
    inc_values = [v[2] for v in inc.values()]
    out.append(
        Claim(
            claim="(e) incidental resurgence under other concepts' prompts",
            verdict=_verdict(bool(inc_values), _mean(inc_values) > NOISE / 5),
            numbers={
                "runs": len(inc_values),
                "mean_incidental_recovery": _mean(inc_values),
                "max_incidental_recovery": max(inc_values, default=math.nan),
                "runs_above_noise": sum(v > NOISE for v in inc_values),
            },
            rule=f"mean rise of the erased concept's presence under others' prompts > {NOISE / 5}",
        )
    )
    # (f)
    syn = recoveries(table, prompts="synonyms")
    both = [(rec[k][2], syn[k][2]) for k in rec if k in syn]
    corr = float(stats.pearsonr(*zip(*both, strict=True))[0]) if len(both) > 2 else math.nan
    s_mean = _mean(p[1] for p in both)
    out.append(
        Claim(
            claim="(f) synonyms resurge with the erased prompt",
            verdict=_verdict(len(both) >= 3, corr > 0.5 and s_mean > NOISE),
            numbers={"runs": len(both), "pearson_erased_vs_synonyms": corr, "mean_synonym_recovery": s_mean},
            rule=f"Pearson(erased recovery, synonym recovery) > 0.5 and mean synonym recovery > {NOISE}",
        )
    )
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def claims_markdown(found: list[Claim]) -> str:
    """A Markdown table: claim, verdict, headline numbers, rule (details in claims.json)."""
    lines = ["| claim | verdict | numbers | rule |", "|---|---|---|---|"]
    for c in found:
        head = {k: v for k, v in c["numbers"].items() if not isinstance(v, dict)}
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {_fmt(head)} | {c['rule']} |")
    return "\n".join(lines) + "\n"
