"""Did unlearning erase, and at what cost: the issue's two unlearning targets, per task x run.

Read from a ``results.csv`` alone (like :mod:`bridge.realworld.claims`), for every task and
unlearning run (method + config):

* the base model's presence of the erased concept (target: >= :data:`BASE_TARGET`);
* presence after unlearning (target: <= :data:`ERASED_TARGET`), and the synonyms' presence;
* the other concepts' own presence before and after unlearning (target: a drop of at most
  :data:`COLLATERAL_TARGET`), the cost of the erasure to what it should leave alone;
* the largest return of the erased concept during benign fine-tuning (presence at any checkpoint
  after step 0 minus presence after unlearning; negative when every run lowered it), with the
  recipe, bin and step where it happened.
"""

from __future__ import annotations

from bridge.realworld.table import ResultsTable, step_of

__all__ = ["BASE_TARGET", "COLLATERAL_TARGET", "ERASED_TARGET", "erasure_markdown", "erasure_rows"]

BASE_TARGET = 0.9
ERASED_TARGET = 0.1
COLLATERAL_TARGET = 0.1


def _values(table: ResultsTable):
    """``{(task, algo, config, type, finetune_algo, finetune_set, prompts, metric): value}``."""
    return {
        (r["task"], r["algo"], r["config"], r["type"], r["finetune_algo"], r["finetune_set"],
         r["prompts"], r["metric"]): float(r["value"])
        for r in table.rows
    }  # fmt: skip


def erasure_rows(table: ResultsTable) -> list[dict]:
    """One dict per (task, unlearning run), task by task in the table's order (module docstring).

    Keys: ``task, method, config, base, unlearned, synonyms_base, synonyms_unlearned, own_base,
    own_unlearned, own_drop, erased_ok, collateral_ok, max_recovery, max_recovery_at``
    (``None`` where the table lacks the number).
    """
    v = _values(table)
    base = {k[0]: k for k in v if k[3] == "base"}
    runs = list(dict.fromkeys((k[0], k[1], k[2]) for k in v if k[3] == "unlearned"))
    tasks = list(dict.fromkeys(r[0] for r in runs))
    runs.sort(key=lambda r: tasks.index(r[0]))  # task by task (merged folders interleave them)
    out = []
    for task, algo, config in runs:

        def at(type_, prompts, metric, head=(task, algo, config)):
            return v.get(head + (type_, "none", "none", prompts, metric))

        b_head = (task, "base", "none") if task in base else None
        b = at("base", "erased", "presence", b_head) if b_head else None
        u = at("unlearned", "erased", "presence")
        own_b = at("base", "others", "own", b_head) if b_head else None
        own_u = at("unlearned", "others", "own")
        best, where = None, None
        for k, value in v.items():
            step = step_of(k[3])
            if k[:3] == (task, algo, config) and step and k[6:] == ("erased", "presence"):
                if u is not None and (best is None or value - u > best):
                    best, where = value - u, f"{k[4]} {k[5]} step {step}"
        drop = None if own_b is None or own_u is None else own_b - own_u
        out.append({
            "task": task, "method": algo, "config": config, "base": b, "unlearned": u,
            "synonyms_base": at("base", "synonyms", "presence", b_head) if b_head else None,
            "synonyms_unlearned": at("unlearned", "synonyms", "presence"),
            "own_base": own_b, "own_unlearned": own_u, "own_drop": drop,
            "erased_ok": None if u is None else u <= ERASED_TARGET,
            "collateral_ok": None if drop is None else drop <= COLLATERAL_TARGET,
            "max_recovery": best, "max_recovery_at": where,
        })  # fmt: skip
    return out


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2g}" if abs(x) < 0.01 and x != 0 else f"{x:.2f}"


def erasure_markdown(rows: list[dict]) -> str:
    """A Markdown table of :func:`erasure_rows` (targets in the header)."""
    lines = [
        f"| task | unlearning | base presence (>= {BASE_TARGET}) | after unlearning "
        f"(<= {ERASED_TARGET}) | synonyms: base -> after | others' own presence: base -> after "
        f"(drop <= {COLLATERAL_TARGET}) | largest return in fine-tuning |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = {True: "", False: " **(missed)**", None: ""}
        at = f" ({r['max_recovery_at']})" if r["max_recovery_at"] else ""
        lines.append(
            f"| {r['task']} | {r['method']} {r['config']} | {_num(r['base'])}"
            f"{mark[None if r['base'] is None else r['base'] >= BASE_TARGET]} | "
            f"{_num(r['unlearned'])}{mark[r['erased_ok']]} | "
            f"{_num(r['synonyms_base'])} -> {_num(r['synonyms_unlearned'])} | "
            f"{_num(r['own_base'])} -> {_num(r['own_unlearned'])}{mark[r['collateral_ok']]} | "
            f"{_num(r['max_recovery'])}{at} |"
        )
    return "\n".join(lines) + "\n"
