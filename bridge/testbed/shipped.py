"""The tiny testbed's pretrained weights, shipped with the package for the default config.

Pretraining the tiny UNet (1,000 AdamW steps) and its concept classifier is a minute and a half
of the demo's budget on 2 cores, and the result is fixed by the config: ``bridge/testbed/weights``
holds the base pipeline (``base/``, SD layout) and the classifier (``classifier.pt``,
``classifier.json``) that ``resurgence bridge demo`` trains for the default config, with a
``fingerprints.json`` that records each file's sha256 and the config keys each part was trained
with. A run whose keys match loads them (checked against the fingerprints first) instead of
training; any other config trains, and ``--set shipped_weights=false`` always trains.

Regenerate after changing the default world, model or training keys::

    resurgence bridge demo --set shipped_weights=false --out runs/retrain
    python -m bridge.testbed.shipped runs/retrain
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bridge.realworld.fingerprints import FINGERPRINTS, verify_fingerprints, write_fingerprints

__all__ = [
    "BASE_KEYS",
    "CLASSIFIER_KEYS",
    "SHIPPED",
    "copy_shipped_base",
    "copy_shipped_classifier",
    "ship",
    "shipped_record",
]

#: The folder of the shipped weights (inside the installed package).
SHIPPED = Path(__file__).resolve().parent / "weights"
#: Config keys that fix the pretrained base pipeline (world, model sizes, pretraining).
BASE_KEYS = (
    "seed", "colours", "shapes", "backgrounds", "size", "block_out_channels", "text_dim",
    "pretrain_steps", "pretrain_batch", "pretrain_lr", "p_null",
)  # fmt: skip
#: Config keys that fix the concept classifier (it is trained on the world's renders only).
CLASSIFIER_KEYS = ("seed", "colours", "shapes", "backgrounds", "size", "classifier_steps")
_CLASSIFIER_FILES = ("classifier.pt", "classifier.json")


def _keys(values: dict, keys) -> dict:
    """The ``keys`` of a config in its ``to_dict`` / ``config.json`` form."""
    return {k: values[k] for k in keys}


def shipped_record(folder: Path = SHIPPED) -> dict | None:
    """The shipped ``fingerprints.json`` (None when the package ships no weights)."""
    path = folder / FINGERPRINTS
    return json.loads(path.read_text()) if path.is_file() else None


def _matches(cfg, part: str, keys, folder: Path) -> bool:
    record = shipped_record(folder)
    return record is not None and record.get("trained_with", {}).get(part) == _keys(
        cfg.to_dict(), keys
    )


def copy_shipped_base(cfg, dest: Path, folder: Path = SHIPPED) -> bool:
    """Copy the shipped base pipeline to ``dest`` when ``cfg``'s :data:`BASE_KEYS` match it.

    Returns:
      True when copied, False when the config needs its own pretraining.

    Raises:
      bridge.realworld.fingerprints.FingerprintError: a shipped file differs from its fingerprint
        (one line; reinstall the package or retrain with ``--set shipped_weights=false``).
    """
    if not _matches(cfg, "base", BASE_KEYS, folder):
        return False
    verify_fingerprints(folder)
    shutil.copytree(folder / "base", dest, dirs_exist_ok=True)
    return True


def copy_shipped_classifier(cfg, dest_dir: Path, folder: Path = SHIPPED) -> bool:
    """Copy the shipped classifier files into ``dest_dir`` when :data:`CLASSIFIER_KEYS` match.

    ``classifier.json`` (the marker the demo checks) is copied last.
    """
    if not _matches(cfg, "classifier", CLASSIFIER_KEYS, folder):
        return False
    verify_fingerprints(folder)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in _CLASSIFIER_FILES:
        shutil.copyfile(folder / name, dest_dir / name)
    return True


def ship(run: Path, folder: Path = SHIPPED) -> Path:
    """Replace the shipped weights by a demo run's base pipeline and classifier.

    Args:
      run: a finished ``resurgence bridge demo`` run folder (its ``config.json``, ``base/``,
        ``classifier.pt``, ``classifier.json``). folder: destination (default :data:`SHIPPED`).

    Returns:
      The written ``fingerprints.json``.

    Raises:
      FileNotFoundError: the run lacks one of those files (named).
    """
    run = Path(run)
    needed = [run / "config.json", run / "base" / "done.json"] + [
        run / n for n in _CLASSIFIER_FILES
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished demo run: missing {missing}.")
    values = json.loads((run / "config.json").read_text())  # DemoConfig.to_dict() of the run
    if json.loads((run / "base" / "done.json").read_text()).get("shipped"):
        raise ValueError(f"{run}/base was copied from the shipped weights, not trained: retrain.")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(run / "base", folder / "base", ignore=shutil.ignore_patterns("done.json"))
    for name in _CLASSIFIER_FILES:
        shutil.copyfile(run / name, folder / name)
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != FINGERPRINTS]
    import torch

    return write_fingerprints(
        folder,
        files,
        extra={
            "trained_with": {
                "base": _keys(values, BASE_KEYS),
                "classifier": _keys(values, CLASSIFIER_KEYS),
            },
            "threads": values["threads"],
            "torch": torch.__version__,
            "command": "resurgence bridge demo --set shipped_weights=false; "
            "python -m bridge.testbed.shipped RUN",
            "licence": "the package's licence; the world is drawn by bridge/testbed/world.py "
            "(no external data)",
        },
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Ship a finished demo run's base pipeline and classifier as the package's "
        "tiny-testbed weights (bridge/testbed/weights)."
    )
    parser.add_argument("run", type=Path, help="demo run folder trained with shipped_weights=false")
    args = parser.parse_args(argv)
    try:
        print(ship(args.run))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
