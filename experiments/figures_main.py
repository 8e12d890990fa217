"""`resurgence figures`: regenerate every default theory figure (and optionally the bridge demo)."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

__all__ = ["FIGURE_MODULES", "make_all_figures"]

# One module per figure of theory.md section 5, in the paper's order.
FIGURE_MODULES = (
    "experiments.figures.fig_phase",
    "experiments.figures.fig_curves",
    "experiments.figures.fig_closure",
    "experiments.figures.fig_presence",
    "experiments.figures.fig_spectrum",
    "experiments.figures.fig_knobs",
)


def make_all_figures(
    out="figures", runs="runs/figures", bridge_demo: bool = False, *, progress: bool = True
):
    """Run the default sweeps (resuming finished ones) and write ``out/theory_*.{png,pdf}``.

    Args:
      out: folder for the figures.
      runs: folder for the sweep results behind them (one sub-folder per config).
      bridge_demo: also run the tiny CPU bridge testbed.
      progress: print one line per figure.

    Returns:
      dict figure name -> :class:`experiments.figures._style.FigureResult`.
    """
    from experiments.sweep import enable_compilation_cache

    enable_compilation_cache()
    results = {}
    start = time.perf_counter()
    for name in FIGURE_MODULES:
        tick = time.perf_counter()
        module = importlib.import_module(name)
        results[module.NAME] = module.make(out, runs, progress=False)
        if progress:
            print(
                f"{module.NAME}: {results[module.NAME].png} ({time.perf_counter() - tick:.1f} s)",
                flush=True,
            )
    if bridge_demo:
        _run_bridge_demo(out, runs)
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
    run_demo(load_demo_config(config), Path(runs) / "bridge_testbed", figures=out)
