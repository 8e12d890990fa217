"""The whole testbed, end to end, with every stage cached on disk (a rerun skips finished stages).

pretrain -> classifier -> unlearn (UCE, UCE V-only, ESD-x, ...) -> presence before/after ->
predicted readouts (presence, output_rho, forget_loss_recovery, rho: bridge curvature + theory
law, :mod:`bridge.testbed.predict`) for every learning rate and step -> the same readouts of
full-batch GD on the same frozen loss, group and seeds -> realistic AdamW fine-tuning of the
whole UNet with presence tracking -> results (netCDF + JSON + manifest, the long-format
prediction table) and figures.

Run folder layout::

    run/base/                 pretrained pipeline (SD layout)
    run/classifier.pt, classifier.json
    run/unlearned/<method>/   unlearned pipelines with manifest.json
    run/predict/<method>.json predicted and measured readouts over (lr, step), spectrum
    run/adamw/<method>-<cfg>/ realistic fine-tuning (checkpoint.pt, history.json; <cfg>: digest)
    run/presence.json         presence before / after unlearning
    run/results.nc, results.json, manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import tomllib
import torch

from bridge.testbed.world import ConceptWorld
from theory._atomic import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    remove_partial_writes,
)

__all__ = ["DemoConfig", "load_demo_config", "run_demo"]

METHODS = ("uce", "uce-v", "esd-x", "esd-u")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every knob of the testbed demo (TOML keys of ``experiments/configs/bridge_testbed.toml``)."""

    seed: int = 0
    threads: int = 1
    # world
    colours: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle",)
    backgrounds: tuple[str, ...] = ("black", "white")
    size: int = 8
    # model + pretraining
    block_out_channels: tuple[int, ...] = (16, 32)
    text_dim: int = 32
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    p_null: float = 0.1
    classifier_steps: int = 600
    # load bridge/testbed/weights when the keys above match the ones it was trained with
    shipped_weights: bool = True
    # unlearning
    erase: str = "a red circle on white"
    methods: tuple[str, ...] = ("uce", "uce-v", "esd-x")
    uce_lam: float = 0.1
    uce_from_token: str = "first"
    uce_preserve: tuple[str, ...] = ()
    esd_steps: int = 60
    esd_lr: float = 1e-3
    esd_guidance: float = 1.0
    # fine-tuning data: concepts that exclude the erased one
    # each shares a word with the erased caption ("red" or "white"), none is the erased concept
    finetune_concepts: tuple[str, ...] = (
        "a red circle on black",
        "a green circle on white",
        "a blue circle on white",
    )
    images_per_concept: int = 8
    # predicted vs measured readouts: full-batch GD on `finetune_group` (a preset, a regex, or
    # "method" for each method's own group); it must cover every tensor each method edits
    finetune_group: str = "cross-attn"
    # GD step sizes as fractions of the stability limit 2/lambda_max measured at theta_u
    gd_lr_fractions: tuple[float, ...] = (0.3, 0.6, 0.9)
    gd_steps: int = 40
    top_k: int = 8
    probe_batch: int = 16
    # realistic fine-tuning: AdamW on the whole UNet, minibatches
    adamw_steps: int = 200
    adamw_lr: float = 3e-4
    adamw_batch: int = 16
    track_every: int = 50
    # presence
    presence_seeds: int = 32
    sample_steps: int = 15
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"`methods` has unknown entries {bad}; allowed: {list(METHODS)}.")
        if self.erase in self.finetune_concepts:
            raise ValueError(f"`finetune_concepts` must exclude the erased concept {self.erase!r}.")
        if not self.finetune_concepts:
            raise ValueError("`finetune_concepts` is empty; give at least one benign concept.")

    @property
    def world(self) -> ConceptWorld:
        return ConceptWorld(
            colours=tuple(self.colours),
            shapes=tuple(self.shapes),
            backgrounds=tuple(self.backgrounds),
            size=self.size,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def load_demo_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DemoConfig:
    """Read a TOML file (flat keys) and ``KEY=VALUE`` overrides (VALUE parsed as TOML).

    Raises:
      ValueError: for unknown keys (named, with the file) or a malformed override.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = tomllib.loads(Path(path).read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must have the form KEY=VALUE (e.g. --set seed=1).")
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            raw[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raw[key] = text
    known = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown} in {path or '--set'}; known: {sorted(known)}."
        )
    tuples = {f.name for f in dataclasses.fields(DemoConfig) if "tuple" in str(f.type)}
    return DemoConfig(**{k: tuple(v) if k in tuples else v for k, v in raw.items()})


def run_demo(
    cfg: DemoConfig,
    run: str | Path,
    *,
    figures: str | Path | None = "figures",
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the whole testbed; return the summary written to ``run/results.json``.

    Args:
      cfg: :class:`DemoConfig`. run: run folder (stages found there are skipped).
      figures: folder for ``bridge_testbed_*.png`` (None: no figures).
      progress: tqdm bars.

    Returns:
      The JSON summary (presence per stage and method, predicted and measured rho, correlation,
      classifier accuracy, stage wall times).
    """
    from bridge.testbed.predict import predict_and_measure, presence_seeds, step_grid
    from bridge.testbed.results import summarise, to_xarray
    from bridge.testbed.stages import Stages, adamw_history, log
    from theory._manifest import write_manifest

    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(run)  # temporaries of a killed run (stage folders clean their own)
    saved_cfg = run / "config.json"
    if saved_cfg.is_file() and json.loads(saved_cfg.read_text()) != cfg.to_dict():
        raise ValueError(
            f"run folder {run} holds a run with another config ({saved_cfg}); "
            "use a new --out folder or delete it."
        )
    atomic_write_json(saved_cfg, cfg.to_dict())
    st = Stages(cfg, run, progress)
    pipe = st.base()
    base, text, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    classifier, accuracy = st.classifier()
    presence = st.presence_hook(text, scheduler, classifier)
    forget = st.forget_batches(text, scheduler)
    images, captions = st.finetune_set(text)
    embeds, null = text.encode_prompts(captions), text.encode_prompts([""])
    steps = step_grid(cfg.gd_steps)

    pres_path = run / "presence.json"
    stage_presence = json.loads(pres_path.read_text()) if pres_path.is_file() else {}
    if "base" not in stage_presence:
        log("presence of the base model")
        stage_presence["base"] = presence(base)
    records: dict[str, Any] = {}
    adamw: dict[str, Any] = {}
    for method in cfg.methods:
        unet = st.unlearned(method, base, text, scheduler)
        if method not in stage_presence:
            log(f"presence after unlearning ({method})")
            stage_presence[method] = presence(unet)
        atomic_write_json(pres_path, stage_presence)
        pred_path = run / "predict" / f"{method}.json"
        if not pred_path.is_file():
            log(f"curvature, predicted and measured readouts ({method})")
            t0 = time.time()
            record = predict_and_measure(
                base,
                unet,
                text,
                scheduler,
                classifier,
                method=method,
                erase=cfg.erase,
                concept=st.world.concept_id(cfg.erase),
                captions=captions,
                images=images,
                forget_batches=forget,
                group=cfg.finetune_group,
                lr_fractions=cfg.gd_lr_fractions,
                steps=steps,
                top_k=cfg.top_k,
                probe_batch=cfg.probe_batch,
                seeds=presence_seeds(cfg.presence_seeds),
                sample_steps=cfg.sample_steps,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
                progress=progress,
            )
            st.timings[f"predict_{method}_s"] = time.time() - t0
            atomic_write_text(pred_path, json.dumps(record, indent=2) + "\n")
        records[method] = json.loads(pred_path.read_text())
        adamw[method] = adamw_history(
            st, method, base, unet, images, embeds, null, forget, scheduler, presence
        )

    summary = summarise(cfg, records, stage_presence, accuracy, adamw)
    summary["timings_s"] = {k: round(v, 2) for k, v in st.timings.items()}
    summary["wall_time_s"] = round(time.time() - t_start, 2)
    atomic_write_json(run / "results.json", summary)
    dataset = to_xarray(cfg, summary)
    atomic_write(run / "results.nc", lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"))
    write_manifest(
        run,
        config=cfg.to_dict(),
        seeds={"seed": cfg.seed},
        wall_time=time.time() - t_start,
        extra={"stage_timings_s": summary["timings_s"]},
    )
    if figures is not None:
        from bridge.testbed.figures import plot_presence, plot_presence_prediction, plot_readouts
        from bridge.testbed.results import rows_to_csv

        figs = Path(figures)
        figs.mkdir(parents=True, exist_ok=True)
        table = rows_to_csv(summary["predictions"])  # the long-format prediction table
        atomic_write_text(figs / "bridge_testbed_predictions.csv", table)
        plot_presence_prediction(summary, figs / "bridge_testbed_presence.png")  # the headline
        plot_readouts(summary, figs / "bridge_testbed_rho.png")
        plot_presence(summary, figs / "bridge_testbed_stages.png")
    log(f"done in {summary['wall_time_s']:.0f} s; results in {run}")
    return summary
