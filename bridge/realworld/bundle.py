"""A trained real-image testbed on disk: UNet, classifiers, world, sources, fingerprints.

Layout of a model folder::

    unet/                     diffusers UNet2DConditionModel (config.json + safetensors)
    scheduler/                the training noise schedule
    classifiers/concept.*     presence classifier (safetensors + json: classes, width, accuracy)
    classifiers/style.*       style classifier
    world.json                concepts, styles, size, augmentation, text length, MiniLM digest
    ATTRIBUTION.txt           data sources, licences and the CC BY-SA notice for OpenMoji
    fingerprints.json         sha256 of every file above, checked before anything loads

The text encoder is not copied: it is the installed MiniLM wheel, identified by the sha256 of
its ``model.safetensors`` in ``world.json`` (a different wheel is refused).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bridge.realworld.classifier import ClassifierReport
from bridge.realworld.fingerprints import (
    FingerprintError,
    sha256_file,
    verify_fingerprints,
    write_fingerprints,
)
from bridge.realworld.sources import SOURCES, minilm_folder
from bridge.realworld.text import MiniLMEncoder, load_minilm
from bridge.realworld.world import Augmentation, RealWorld
from bridge.testbed.classifier import ConceptClassifier

__all__ = [
    "SHIPPED_MODEL",
    "RealWorldModel",
    "load_model",
    "save_model",
    "world_from_dict",
    "world_to_dict",
]

#: The trained testbed shipped with the package (``resurgence bridge realworld train`` with the
#: default config; weights derive from OpenMoji's CC BY-SA 4.0 drawings, see ATTRIBUTION.txt).
SHIPPED_MODEL = Path(__file__).resolve().parent / "weights"


def world_to_dict(world: RealWorld) -> dict[str, Any]:
    """JSON-able description of ``world`` (lists, not tuples, so it round-trips)."""
    aug = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(world.augmentation).items()
    }
    return {
        "concepts": list(world.concepts),
        "styles": list(world.styles),
        "size": world.size,
        "augmentation": aug,
    }


def world_from_dict(data: dict[str, Any]) -> RealWorld:
    """Inverse of :func:`world_to_dict`."""
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in data["augmentation"].items()}
    return RealWorld(
        concepts=tuple(data["concepts"]),
        styles=tuple(data["styles"]),
        size=int(data["size"]),
        augmentation=Augmentation(**aug),
    )


@dataclasses.dataclass
class RealWorldModel:
    """Everything a run needs from a trained folder (``text`` has ``encode_prompts``)."""

    unet: Any
    scheduler: Any
    text: MiniLMEncoder
    world: RealWorld
    presence: ConceptClassifier
    style: ConceptClassifier
    info: dict


def _save_classifier(report: ClassifierReport, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, meta = folder / f"{report.target}.safetensors", folder / f"{report.target}.json"
    save_file({k: v.contiguous() for k, v in report.model.state_dict().items()}, str(weights))
    width = report.model.net[0].out_channels
    meta.write_text(
        json.dumps(
            {
                "target": report.target,
                "classes": list(report.classes),
                "width": width,
                "heldout_accuracy": report.heldout_accuracy,
                "per_class_accuracy": report.per_class_accuracy,
                "train_steps": report.train_steps,
            },
            indent=1,
            sort_keys=True,
        )
    )
    return [weights, meta]


def _attribution(world: RealWorld) -> str:
    keys = ["minilm", "emoji", *(s for s in world.styles)]
    lines = ["Data sources of these weights (trained on renders made at run time):", ""]
    for key in keys:
        src = SOURCES[key]
        lines.append(f"- {src.name} {src.version}: {src.licence}. {src.attribution}")
    if "openmoji" in world.styles:
        lines += [
            "",
            "The UNet and classifiers were trained on OpenMoji drawings (CC BY-SA 4.0,",
            "https://creativecommons.org/licenses/by-sa/4.0/): credit OpenMoji and share",
            "derived images under the same licence.",
        ]
    return "\n".join(lines) + "\n"


def save_model(
    out_dir, world: RealWorld, text: MiniLMEncoder, reports, *, train_info: dict
) -> Path:
    """Complete a folder where :func:`~bridge.realworld.train.train_unet` saved ``unet/``.

    Writes the classifiers, ``world.json``, ``ATTRIBUTION.txt`` and, last, ``fingerprints.json``
    over every file of the bundle.

    Args:
      out_dir: the model folder (holds ``unet/`` and ``scheduler/``).
      world: the world the models were trained on. text: the MiniLM encoder used.
      reports: :class:`~bridge.realworld.classifier.ClassifierReport` of each classifier.
      train_info: JSON-able training facts recorded in ``world.json`` (config, step time, loss).

    Returns:
      The path of ``fingerprints.json``.
    """
    out = Path(out_dir).resolve()  # the files below are then absolute, whatever the cwd
    files = [
        p for sub in ("unet", "scheduler") for p in sorted((out / sub).glob("*")) if p.is_file()
    ]
    for report in reports:
        files += _save_classifier(report, out / "classifiers")
    world_json = out / "world.json"
    world_json.write_text(
        json.dumps(
            {
                "world": world_to_dict(world),
                "text": {
                    "model": "all-MiniLM-L6-v2",
                    "max_length": text.max_length,
                    "safetensors_sha256": sha256_file(minilm_folder() / "model.safetensors"),
                },
                "train": train_info,
            },
            indent=1,
            sort_keys=True,
        )
    )
    attribution = out / "ATTRIBUTION.txt"
    attribution.write_text(_attribution(world))
    files += [world_json, attribution]
    sources = {k: dataclasses.asdict(SOURCES[k]) for k in ("minilm", "emoji", *world.styles)}
    return write_fingerprints(out, files, extra={"sources": sources})


def _load_classifier(folder: Path, target: str) -> ConceptClassifier:
    from safetensors.torch import load_file

    meta = json.loads((folder / f"{target}.json").read_text())
    model = ConceptClassifier(len(meta["classes"]), width=int(meta["width"]))
    model.load_state_dict(load_file(str(folder / f"{target}.safetensors")))
    return model.eval()


def load_model(folder, *, verify: bool = True) -> RealWorldModel:
    """Load a folder written by ``resurgence bridge realworld train`` (fingerprints first).

    Args:
      folder: the model folder. verify: check ``fingerprints.json`` before loading (default).

    Returns:
      :class:`RealWorldModel`.

    Raises:
      FingerprintError: a file differs from its fingerprint, or the installed MiniLM differs
        from the one the UNet was trained with.
      MissingDataError: a data package the world needs is not installed.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = Path(folder)
    if verify:
        verify_fingerprints(folder)
    info = json.loads((folder / "world.json").read_text())
    installed = sha256_file(minilm_folder() / "model.safetensors")
    if installed != info["text"]["safetensors_sha256"]:
        raise FingerprintError(
            f"the installed MiniLM (sha256 {installed[:16]}...) is not the one {folder} was trained "
            f"with ({info['text']['safetensors_sha256'][:16]}...); install "
            f"`{SOURCES['minilm'].install}` or retrain."
        )
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).eval()
    sched = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return RealWorldModel(
        unet=unet,
        scheduler=sched,
        text=load_minilm(max_length=int(info["text"]["max_length"])),
        world=world_from_dict(info["world"]),
        presence=_load_classifier(folder / "classifiers", "concept"),
        style=_load_classifier(folder / "classifiers", "style"),
        info=info,
    )
