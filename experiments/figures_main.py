"""`resurgence figures`: regenerate every default theory figure (and optionally the bridge demo)."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from pathlib import Path

__all__ = [
    "FIGURE_MODULES",
    "SUMMARY_NAME",
    "bridge_summary",
    "compare_summaries",
    "default_jobs",
    "make_all_figures",
]

# Every number a figure title, docs/figures.md or the README states, as the run computed it.
SUMMARY_NAME = "summary.json"
# Tolerance of the reproducibility check (tests/test_reproducibility.py): the theory numbers are
# exact computations or Monte-Carlo estimates with fixed keys, so machines and BLAS thread counts
# move them by round-off only (measured <= 1e-12); 1e-6 keeps six orders of margin and still
# fails on any real change of a headline number. Counts and labels must match exactly.
SUMMARY_ABS_TOLERANCE = 1e-6
# Except numbers built on Monte-Carlo presence (K > 2 classes: the fraction of 1,024 fixed samples
# whose argmax is the concept) and rank statistics of them: a sample on a class boundary flips
# with the CPU's round-off and moves a presence by 1/1024. Measured: an AMD EPYC host moved the
# readouts figure's Spearmans by 1.3e-3 against the machine that wrote the summary. 5e-3 allows
# a few flipped samples and still fails on a real change.
MONTE_CARLO_KEYS = re.compile(r"presence|spearman")
MONTE_CARLO_ABS_TOLERANCE = 5e-3

# One module per figure of theory.md section 5, in the paper's order.
FIGURE_MODULES = (
    "experiments.figures.fig_phase",
    "experiments.figures.fig_curves",
    "experiments.figures.fig_closure",
    "experiments.figures.fig_presence",
    "experiments.figures.fig_spectrum",
    "experiments.figures.fig_knobs",
    "experiments.figures.fig_readouts",
    "experiments.figures.fig_guard",
)

# The same modules, costliest first (cold wall seconds on 2 cores), so that with several jobs
# the long figures start first and the short ones fill in.
_BY_COST = (
    "experiments.figures.fig_guard",
    "experiments.figures.fig_phase",
    "experiments.figures.fig_curves",
    "experiments.figures.fig_knobs",
    "experiments.figures.fig_readouts",
    "experiments.figures.fig_closure",
    "experiments.figures.fig_spectrum",
    "experiments.figures.fig_presence",
)


def _make_figure(module_name: str, out, runs):
    """One figure (in a worker process when ``jobs > 1``):
    ``(module name, NAME, FigureResult, seconds)``."""
    from experiments.sweep import enable_compilation_cache

    enable_compilation_cache()
    tick = time.perf_counter()
    module = importlib.import_module(module_name)
    result = module.make(out, runs, progress=False)
    return module_name, module.NAME, result, time.perf_counter() - tick


def _init_worker() -> None:
    """Start a figure worker's JAX backend (one-thread pool, threads free to use every CPU)."""
    from theory._backend import init_backend_without_lapack_deadlock

    init_backend_without_lapack_deadlock()


def default_jobs() -> int:
    """Worker processes for the figures: the CPUs this process may use, at most one a figure."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, len(FIGURE_MODULES)))


def make_all_figures(
    out="figures",
    runs="runs/figures",
    bridge_demo: bool = False,
    *,
    jobs: int = 1,
    progress: bool = True,
):
    """Run the default sweeps (resuming finished ones) and write ``out/theory_*.{png,pdf}``.

    Args:
      out: folder for the figures.
      runs: folder for the sweep results behind them (one sub-folder per config).
      bridge_demo: also run the tiny CPU bridge testbed.
      jobs: figures made side by side in this many processes (each figure's sweep and XLA
        compile run on one core most of the time, so a second core halves the wall time; the
        numbers are the same computations, so they do not change).
      progress: print one line per figure.

    Returns:
      dict figure name -> :class:`experiments.figures._style.FigureResult`, in the paper's order.

    Raises:
      ValueError: ``jobs < 1``.
    """
    if jobs < 1:
        raise ValueError(f"`jobs` must be >= 1, got {jobs}.")
    done = {}
    start = time.perf_counter()

    def report(module_name, name, result, seconds) -> None:
        done[module_name] = (name, result)
        if progress:
            print(f"{name}: {result.png} ({seconds:.1f} s)", flush=True)

    if jobs == 1:
        for module_name in FIGURE_MODULES:
            report(*_make_figure(module_name, out, runs))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a forked child inherits JAX's and BLAS's threads in an unknown state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_init_worker
        ) as pool:
            futures = [pool.submit(_make_figure, m, out, runs) for m in _BY_COST]
            for future in as_completed(futures):
                report(*future.result())
    results = dict(done[m] for m in FIGURE_MODULES)  # the paper's order, whatever finished first
    summary = {name: result.summary for name, result in results.items()}
    if bridge_demo:
        summary["bridge_testbed"] = bridge_summary(_run_bridge_demo(out, runs))
    _write_summary(Path(out) / SUMMARY_NAME, summary)
    if progress:
        print(f"all figures in {time.perf_counter() - start:.1f} s -> {Path(out)}", flush=True)
    return results


def _run_bridge_demo(out, runs) -> None:
    """THE BRIDGE HOOK: the tiny CPU bridge testbed, default config, into ``runs/bridge_testbed``.

    Raises:
      RuntimeError: the bridge testbed (bridge/testbed/, torch + diffusers) cannot be imported.
    """
    try:
        from bridge.testbed.demo import load_demo_config, run_demo
    except ImportError as err:
        raise RuntimeError(
            f"`--bridge-demo` needs the bridge testbed (bridge/testbed/), which could not be "
            f"imported: {err}. Run `resurgence figures` without `--bridge-demo` for the theory "
            "figures only."
        ) from err
    config = Path(__file__).resolve().parent / "configs" / "bridge_testbed.toml"
    return run_demo(load_demo_config(config), Path(runs) / "bridge_testbed", figures=out)


# The bridge testbed's headline numbers (README, figure titles): presence per stage, rho pairs.
_BRIDGE_PER_METHOD = (
    "presence_before",
    "presence_unlearned",
    "presence_finetuned",
    "presence_gd_finetuned",
    "gd_rho_final",
    "adamw_rho_final",
)


def bridge_summary(demo: dict) -> dict:
    """The numbers of the bridge testbed's summary that the README and figures state."""
    keep = {k: v for k, v in demo.items() if not isinstance(v, (dict, list))}
    keep["methods"] = {
        m: {k: r.get(k) for k in _BRIDGE_PER_METHOD} for m, r in demo.get("methods", {}).items()
    }
    keep.pop("wall_time_s", None)
    for key in ("metrics", "metrics_alternatives"):  # predicted vs measured, per readout
        if key in demo:
            keep[key] = demo[key]
    return keep


def _write_summary(path: Path, summary: dict) -> None:
    """Merge into ``path`` (a theory-only run keeps the bridge entry of an earlier demo run)."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(summary)
    merged["_about"] = (
        "Headline numbers of the default run, written by `resurgence figures`; "
        "tests/test_reproducibility.py regenerates the theory entries and compares them to "
        f"{SUMMARY_ABS_TOLERANCE:g} (absolute; {MONTE_CARLO_ABS_TOLERANCE:g} for Monte-Carlo "
        "presence and its Spearmans; counts and labels exactly)."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def compare_summaries(committed, regenerated, *, atol=SUMMARY_ABS_TOLERANCE, where="") -> list[str]:
    """Differences between two summaries: one line per number off by more than ``atol`` (or
    any change of a count, label or key)."""
    problems = []
    if isinstance(committed, dict) and isinstance(regenerated, dict):
        for key in sorted(set(committed) | set(regenerated)):
            if key not in committed or key not in regenerated:
                problems.append(f"{where}/{key}: present in only one summary")
                continue
            tol = max(atol, MONTE_CARLO_ABS_TOLERANCE) if MONTE_CARLO_KEYS.search(key) else atol
            problems += compare_summaries(
                committed[key], regenerated[key], atol=tol, where=f"{where}/{key}"
            )
        return problems
    is_float = isinstance(committed, float) or isinstance(regenerated, float)
    if is_float and isinstance(committed, (int, float)) and isinstance(regenerated, (int, float)):
        both_nan = math.isnan(committed) and math.isnan(regenerated)
        if not both_nan and not abs(committed - regenerated) <= atol:
            problems.append(f"{where}: committed {committed!r}, regenerated {regenerated!r}")
    elif committed != regenerated:
        problems.append(f"{where}: committed {committed!r}, regenerated {regenerated!r}")
    return problems
