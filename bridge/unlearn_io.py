"""Saving unlearned UNets as diffusers folders with a manifest, and loading them back checked.

A folder written here is an SD layout (``unet/`` plus, when the base folder is given, its
``text_encoder/``, ``tokenizer/`` and ``scheduler/``) and a ``manifest.json`` recording the method,
its arguments, package versions, seed, git commit and a fingerprint of the base UNet. Each part is
written atomically and the manifest last, so a folder with a manifest is complete. Checkpoints
made by other tools (MACE, SalUn, SHS, EraseDiff, SDD releases: folders or state-dict files) load
through the same :func:`load_unlearned`, which checks the fingerprint when a manifest exists.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from theory._atomic import atomic_directory, atomic_write, remove_partial_writes
from theory._atomic import atomic_write_json as write_json  # re-exported: one JSON writer

__all__ = ["base_fingerprint", "load_unlearned", "run_manifest", "save_unlearned", "write_json"]


def base_fingerprint(unet) -> str:
    """SHA-256 (16 hex digits) of every UNet tensor, in sorted-name order, as float32 bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_manifest(**fields: Any) -> dict[str, Any]:
    """A manifest dict: the given fields plus package versions, git commit and Python version."""
    from theory._manifest import git_commit, package_versions

    return {
        **fields,
        "versions": {**package_versions(), "python": platform.python_version()},
        "git_commit": git_commit()["commit"],
    }


def save_unlearned(
    unet,
    folder: str | Path,
    *,
    method: str,
    args: dict[str, Any],
    seed: int | None,
    base_unet,
    base_folder: str | Path | None = None,
) -> Path:
    """Save ``unet`` as ``folder/unet`` with ``manifest.json``; copy the base's other components.

    Args:
      unet: the unlearned ``UNet2DConditionModel``.
      folder: destination pipeline folder.
      method: method name (``uce``, ``esd-x``, ``esd-u``, ...); args: its arguments.
      seed: the seed used (None for closed forms).
      base_unet: the UNet it was unlearned from (its fingerprint goes in the manifest).
      base_folder: the base pipeline folder, whose ``text_encoder/``, ``tokenizer/``,
        ``scheduler/`` and ``model_index.json`` are copied so ``folder`` is a full pipeline.

    Returns:
      ``folder`` as a ``Path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(folder)  # what a killed save left
    # the manifest marks a complete folder: drop an old one before touching the parts
    (folder / "manifest.json").unlink(missing_ok=True)
    with atomic_directory(folder / "unet") as tmp:
        unet.save_pretrained(tmp)
    if base_folder is not None:
        base_folder = Path(base_folder)
        for sub in ("text_encoder", "tokenizer", "scheduler", "feature_extractor"):
            if (base_folder / sub).is_dir() and not (folder / sub).exists():
                with atomic_directory(folder / sub) as tmp:
                    shutil.copytree(base_folder / sub, tmp, dirs_exist_ok=True)
        if (base_folder / "model_index.json").is_file():
            atomic_write(
                folder / "model_index.json",
                lambda tmp: shutil.copyfile(base_folder / "model_index.json", tmp),
            )
    manifest = run_manifest(
        method=method,
        args=args,
        seed=seed,
        base_folder=str(base_folder) if base_folder else None,
        base_fingerprint=base_fingerprint(base_unet),
    )
    write_json(folder / "manifest.json", manifest)
    return folder


def load_unlearned(base_unet, path: str | Path):
    """Load an unlearned UNet (ours or another tool's) against ``base_unet``.

    Folders and state-dict files go through :func:`bridge.loading.load_unlearned_unet` (same
    architecture required). When the folder has our ``manifest.json``, its base fingerprint must
    equal ``base_unet``'s.

    Args:
      base_unet: the base UNet the checkpoint claims to come from.
      path: pipeline/UNet folder or state-dict file.

    Returns:
      The unlearned UNet (eval mode).

    Raises:
      ValueError: if the manifest's base fingerprint differs from ``base_unet``'s, or (from the
        loader) on an architecture mismatch.
      FileNotFoundError: if ``path`` does not exist.
    """
    from bridge.loading import load_unlearned_unet

    path = Path(path)
    unet = load_unlearned_unet(base_unet, path)
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("base_fingerprint")
        actual = base_fingerprint(base_unet)
        if recorded is not None and recorded != actual:
            raise ValueError(
                f"the unlearned checkpoint {path} was made from a base UNet with fingerprint "
                f"{recorded}, but the given base has fingerprint {actual}; pass the base it was "
                "unlearned from (see its manifest.json `base_folder`)."
            )
    else:
        same = sum(
            torch.equal(a, b)
            for a, b in zip(
                base_unet.state_dict().values(), unet.state_dict().values(), strict=True
            )
        )
        if same == 0:
            warnings.warn(
                f"no tensor of {path} equals the base UNet's: it may come from another base "
                "(no manifest.json to check against).",
                stacklevel=2,
            )
    return unet
