"""Run manifests: what produced a result folder (package versions, git commit, seeds, config, time).

Generic on purpose: theory sweeps and bridge runs both call :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from theory._atomic import atomic_write_json

__all__ = ["config_hash", "git_commit", "package_versions", "write_manifest", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
_PACKAGES = (
    "resurgence",
    "jax",
    "jaxlib",
    "numpy",
    "scipy",
    "optax",
    "xarray",
    "h5netcdf",
    "matplotlib",
    "torch",
    "diffusers",
    "transformers",
)


def package_versions(packages=_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(folder=None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository holding this package."""
    cwd = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def config_hash(config: Any) -> str:
    """sha256 (16 hex digits) of a config: its ``to_toml()`` text, else its sorted JSON."""
    text = (
        config.to_toml()
        if hasattr(config, "to_toml")
        else json.dumps(config, sort_keys=True, default=str)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_manifest(folder, *, config, seeds, wall_time: float, extra: dict | None = None) -> Path:
    """Write ``folder/manifest.json`` and return its path.

    Args:
      folder: the run's output folder (created if missing).
      config: a config object with ``to_dict()``/``to_toml()`` or a plain JSON-able dict.
      seeds: the PRNG seeds the run used (any JSON-able value).
      wall_time: seconds this invocation took.
      extra: more JSON-able fields (e.g. chunks resumed, devices).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    as_dict = config.to_dict() if hasattr(config, "to_dict") else config
    manifest = {
        "config": as_dict,
        "config_hash": config_hash(config),
        "seeds": seeds,
        "wall_time_s": round(float(wall_time), 3),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        **(extra or {}),
    }
    return atomic_write_json(folder / MANIFEST_NAME, manifest)
