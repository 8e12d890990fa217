"""Every benchmark figure with its reference (measured in the same run), in one table.

    python -m benchmarks.run_all                 # reduced sizes (make bench), ~5 min on 2 cores
    python -m benchmarks.run_all --full          # each benchmark's default sizes (+ cold figures)
    python -m benchmarks.run_all --only bridge-curvature --json out.json

Each benchmark runs in its own process (its thread and JAX settings stay its own) and prints its
JSON report; this module reads it back. The table lists first the figures that have a reference
and a target (issue 12), then every other number each benchmark reported. Timings are noisy on a
shared machine: read the ratios, which compare two things measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bench:
    """One benchmark module and its arguments at reduced and at full size."""

    module: str
    reduced: tuple[str, ...]
    full: tuple[str, ...] = ()


BENCHES: dict[str, Bench] = {
    "theory": Bench("benchmarks.bench_theory", ()),  # 1e5 configurations take < 1 s
    "sweep": Bench(
        "benchmarks.bench_sweep",
        ("--configs", "500", "--lrs", "50", "--engine-problems", "8", "--skip-figures"),
    ),
    "bridge-curvature": Bench("benchmarks.bench_bridge_curvature", ()),
    "bridge-testbed": Bench("benchmarks.bench_testbed", ()),
}


@dataclass(frozen=True)
class Figure:
    """A figure with its reference: value / reference is the ratio, ``target`` bounds it."""

    bench: str
    label: str
    value: str  # dotted path into the benchmark's report
    reference: str | None = None  # dotted path of the reference measured in the same run
    reference_label: str = ""
    ratio: str = "value/reference"  # or "reference/value" (a speed-up)
    target: str = ""  # e.g. "<= 2.0" (on the ratio) or ">= 1e6" (on the value)
    on: str = "ratio"  # what the target bounds: "ratio" or "value"


CURV = "hvp_cost_tiny_f32_kv1280"
K128 = "ends_top5_tol1e-3_tiny_f64_k128"
KV256 = "ends_top5_tol1e-3_tiny_f64_kv256"
DET = "determinism_tiny_k128"

FIGURES: list[Figure] = [
    # Issue 12's unit: rho values/s (configurations x step counts); its reference, 1.4e6/s, was
    # the pre-fix kernel with JAX's default client, reproduced here in the same run.
    *[
        Figure(
            "theory",
            f"predict_rho rho(T) values/s, {client}",
            f"{path}.rho_values_per_s_jax",
            f"{path}.rho_values_per_s_pre_fix_kernel",
            "pre-exactness-fix kernel (1-(1-x)^T)/lambda, same client",
            target=">= 1e6",
            on="value",
        )
        for client, path in (
            ("one-thread pool (package)", "predict_rho"),
            ("JAX default client", "predict_rho_jax_default_client"),
        )
    ],
    Figure(
        "theory",
        "predict_rho configurations/s (64 eigenpairs x 5 T)",
        "predict_rho.configurations_per_s_jax",
        "predict_rho.configurations_per_s_numpy_loop",
        "NumPy loop configurations/s",
    ),
    Figure(
        "theory",
        "predict_rho configurations/s (64 eigenpairs x 5 T)",
        "predict_rho.configurations_per_s_jax",
        "predict_rho.configurations_per_s_expm1_form",
        "the exact expm1/log1p form (traced step counts), configurations/s",
    ),
    Figure(
        "theory",
        "fine-tuning closed form + law, s (d=256)",
        "pipeline.finetune_setup+gd_closed_form+law_s",
        "pipeline.numpy_finetune_s",
        "NumPy (eigh per level), s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "sweep jit(vmap) run, s",
        "jax_run_s",
        "numpy_loop_s",
        "NumPy loop, s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "sweep incl. compile, s",
        "jax_first_call_s (compile+run)",
        "numpy_loop_s",
        "NumPy loop, s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "lr x T grid on fixed problems, s",
        "lr_grid.jax_run_s",
        "lr_grid.numpy_loop_s",
        "NumPy loop, s",
        ratio="reference/value",
        target=">= 30",
    ),
    Figure(
        "sweep",
        "lr x T grid vs factored NumPy loop, s",
        "lr_grid.jax_run_s",
        "lr_grid.numpy_factored_loop_s",
        "NumPy loop, eigh once per problem, s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "problem-changing axes sweep, s",
        "problem_axes.sweep_s",
        "problem_axes.eigh_floor_s",
        "its eigh alone (LAPACK floor), s",
        ratio="reference/value",
        target=">= 0.8",
    ),
    Figure(
        "sweep",
        "problem-changing axes sweep, s",
        "problem_axes.sweep_s",
        "problem_axes.lapack_floor_s",
        "its eigh + theta_0 inverses alone, s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "engine: 8-method grid, s per config",
        "engine.new_8method_grid_per_config_s",
        "engine.old_8method_grid_per_config_s",
        "old kernel (all 8 methods each), s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "engine: old kernel, 8-method vs 1-method per config",
        "engine.old_8method_grid_per_config_s",
        "engine.old_1method_grid_per_config_s",
        "old kernel, 1 method, s",
    ),
    Figure(
        "sweep",
        "engine: UCE, 16 lrs per problem, s per config",
        "engine.uce_16lr_per_config_s",
        "engine.uce_1lr_per_config_s",
        "1 lr per problem, s",
        ratio="reference/value",
    ),
    Figure(
        "sweep",
        "cold figure set, one job a CPU, s (--full only)",
        "figures_wall_s",
        "figures_wall_s_jobs1",
        "one job, s",
        ratio="reference/value",
        target="<= 30",
        on="value",
    ),
    *[
        Figure(
            "bridge-curvature",
            f"HVP {m}, s (f32, 1,280 K/V)",
            f"{CURV}.hvp_{m}_s",
            f"{CURV}.grad_s",
            "gradient, s",
            target="<= 2.0" if m == "graph-reuse" else "",
        )
        for m in ("graph-reuse", "double-backward", "finite-difference", "forward-over-reverse")
    ],
    Figure(
        "bridge-curvature",
        "graph-reuse build + first HVP, s",
        f"{CURV}.graph_build_and_first_hvp_s",
        f"{CURV}.grad_s",
        "gradient, s",
    ),
    Figure("bridge-curvature", "graph-reuse retained graphs, bytes", f"{CURV}.graph_bytes"),
    *[
        Figure(
            "bridge-curvature",
            f"both ends top-5 tol 1e-3, HVPs ({tag})",
            f"{path}.lanczos_hvps",
            f"{path}.eigsh_hvps",
            "2 eigsh calls, HVPs",
            target="<= 45",
            on="value",
        )
        for tag, path in (("k128", K128), ("kv256", KV256))
    ],
    *[
        Figure(
            "bridge-curvature",
            f"both ends: max |eig err| / ||H|| ({tag})",
            f"{path}.lanczos_max_eig_err_rel",
            f"{path}.eigsh_max_eig_err_rel",
            "eigsh, same",
            target="<= 1e-3",
            on="value",
        )
        for tag, path in (("k128", K128), ("kv256", KV256))
    ],
    *[
        Figure(
            "bridge-curvature",
            f"determinism rtol, {d}",
            f"{DET}.{d}.hvp_rtol",
            f"{DET}.{d}.old_rtol_1e3_eps",
            "old rtol 1e3 eps",
        )
        for d in ("float64", "float32", "bfloat16", "float16")
    ],
    *[
        Figure(
            "bridge-curvature",
            f"dropout / re-drawn noise vs rtol, {d}",
            f"{DET}.{d}.dropout_diff_over_rtol",
            f"{DET}.{d}.redrawn_noise_diff_over_rtol",
            "re-drawn noise / rtol",
            target="> 1",
            on="value",
        )
        for d in ("float64", "float32", "bfloat16", "float16")
    ],
]


def _get(report: dict, path: str) -> Any:
    """``report`` at a dotted ``path`` (keys may contain dots: the longest match wins)."""
    node: Any = report
    while path:
        if not isinstance(node, dict):
            return None
        key = next(
            (
                k
                for k in sorted(node, key=len, reverse=True)
                if path == k or path.startswith(k + ".")
            ),
            None,
        )
        if key is None:
            return None
        node, path = node[key], path[len(key) + 1 :]
    return node


def _leaves(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, bool | str) or node is None:
        return
    elif isinstance(node, int | float):
        yield prefix, node


def _meets(value: float, target: str) -> str:
    if not target:
        return ""
    op, bound = target.split()
    ok = {
        "<=": value <= float(bound),
        ">=": value >= float(bound),
        ">": value > float(bound),
        "<": value < float(bound),
    }[op]
    return "yes" if ok else "NO"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e9):
        return f"{int(x):,}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def run_bench(name: str, bench: Bench, full: bool) -> dict:
    """Run one benchmark in a fresh process and return its JSON report (or the error)."""
    args = list(bench.full if full else bench.reduced)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", bench.module, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["no output"], "wall_s": wall}
    text = done.stdout[done.stdout.index("{") :]
    report, _ = json.JSONDecoder().raw_decode(text)
    report["_wall_s"] = round(wall, 1)
    report["_load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return report


def _testbed_figures(report: dict) -> list[Figure]:
    """One row per testbed stage: seconds against the reference forward pass of the same run."""
    stages = _get(report, "cpu.stages") or {}
    return [
        Figure(
            "bridge-testbed",
            f"{name}, s ({stage.get('unit', '')})",
            f"cpu.stages.{name}.seconds",
            "cpu.reference_forward_b64_s",
            "UNet forward, batch 64, s",
        )
        for name, stage in stages.items()
    ]


def table(reports: dict[str, dict]) -> list[list[str]]:
    """Rows: benchmark, figure, value, reference (label: value), ratio, target, met."""
    rows, used = [], {name: set() for name in reports}
    figures = FIGURES + _testbed_figures(reports.get("bridge-testbed", {}))
    for fig in figures:
        report = reports.get(fig.bench)
        if report is None:
            continue
        value = _get(report, fig.value)
        if value is None:
            continue
        ref = _get(report, fig.reference) if fig.reference else None
        used[fig.bench] |= {fig.value, fig.reference}
        ratio = None
        if isinstance(ref, int | float) and ref and value:
            ratio = value / ref if fig.ratio == "value/reference" else ref / value
        checked = ratio if fig.on == "ratio" else value
        rows.append(
            [
                fig.bench,
                fig.label,
                _fmt(value),
                f"{fig.reference_label}: {_fmt(ref)}" if fig.reference else "-",
                _fmt(ratio) if ratio is not None else "-",
                fig.target or "-",
                _meets(checked, fig.target) if checked is not None else "",
            ]
        )
    for name, report in reports.items():
        for path, value in _leaves(report):
            if (
                path not in used[name]
                and not path.startswith("_")
                and not path.endswith("ratio_to_reference")  # the table computes it
            ):
                rows.append([name, path, _fmt(value), "-", "-", "-", ""])
        rows.append(
            [name, "benchmark wall time, s", _fmt(report.get("_wall_s")), "-", "-", "-", ""]
        )
        load = report.get("_load_1min")
        if load:  # 2 cores shared: a load above 2 slows every figure of this benchmark
            text = f"{load[0]} / {load[1]}"
            rows.append([name, "load average (1 min) before / after", text, "-", "-", "-", ""])
        if "error" in report:
            rows.append([name, "ERROR", " ".join(report["error"])[:120], "-", "-", "-", "NO"])
    return rows


def render(rows: list[list[str]]) -> str:
    head = ["benchmark", "figure", "value", "reference (same run)", "ratio", "target", "met"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="default sizes of every benchmark")
    parser.add_argument("--only", action="append", choices=sorted(BENCHES), help="repeatable")
    parser.add_argument("--json", help="also write all reports to this file")
    args = parser.parse_args(argv)
    reports = {}
    for name in args.only or BENCHES:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        reports[name] = run_bench(name, BENCHES[name], args.full)
    print(render(table(reports)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return reports


if __name__ == "__main__":
    main()
