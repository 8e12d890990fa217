"""Shared plotting style and plumbing for the theory figures (sized for a ~700 px README column)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
WIDTH_IN = 8.0  # 8 in at 110 dpi = 880 px: text stays legible when shown 700 px wide
DPI = 110
METHOD_COLORS = {
    "uce": "#1f77b4",
    "mace": "#aec7e8",
    "esd_x": "#ff7f0e",
    "esd_u": "#ffbb78",
    "sdd": "#2ca02c",
    "salun": "#d62728",
    "scissorhands": "#9467bd",
    "erasediff": "#8c564b",
}
STYLE = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "figure.titlesize": 12.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.08,
}


@dataclasses.dataclass
class FigureResult:
    """Paths written and the arrays plotted (name -> numpy array), for tests and reuse."""

    png: Path
    pdf: Path
    data: dict
    dataset: object = None
    # The numbers the figure's title and the docs state (JSON-able), collected into summary.json.
    summary: dict = dataclasses.field(default_factory=dict)


def figure(nrows=1, ncols=1, height=3.6, **kwargs):
    """A figure WIDTH_IN wide with the shared style applied."""
    plt.rcParams.update(STYLE)
    return plt.subplots(nrows, ncols, figsize=(WIDTH_IN, height), **kwargs)


def save(fig, out, name: str) -> tuple[Path, Path]:
    """Write ``out/name.png`` and ``out/name.pdf`` and close the figure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    fig.savefig(png, dpi=DPI)
    fig.savefig(pdf, metadata={"CreationDate": None})  # byte-stable reruns: no timestamp
    plt.close(fig)
    return png, pdf


def run_default(name: str, runs, *, config=None, progress: bool = False, overrides=()):
    """Run (or resume) ``configs/<name>.toml`` (or ``config``) into ``runs/<name>``."""
    import jax

    from experiments.config import load_config
    from experiments.sweep import run_sweep

    jax.config.update("jax_enable_x64", True)
    cfg = config if config is not None else load_config(CONFIG_DIR / f"{name}.toml", overrides)
    # force: runs/ behind the figures is a cache of the current default configs.
    return run_sweep(cfg, Path(runs) / cfg.name, progress=progress, force=True)
