"""sha256 fingerprints of trained files, written beside them and checked before they load.

``fingerprints.json`` in a model folder maps each file (path relative to the folder, ``/``
separated) to its sha256, and records the data sources and attributions the weights derive
from. :func:`verify_fingerprints` refuses a folder whose files differ from that record, with one
line naming the file, both digests and the remedy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "FINGERPRINTS",
    "FingerprintError",
    "sha256_file",
    "verify_fingerprints",
    "write_fingerprints",
]

#: Name of the fingerprint record inside a model folder.
FINGERPRINTS = "fingerprints.json"


class FingerprintError(ValueError):
    """A file of a model folder is missing or differs from its recorded fingerprint."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_fingerprints(
    folder: str | Path, files: Iterable[str | Path], *, extra: dict | None = None
) -> Path:
    """Fingerprint ``files`` (paths inside ``folder``) into ``folder/fingerprints.json``.

    Args:
      folder: the model folder. files: the files to record (absolute or relative to ``folder``).
      extra: more JSON-able fields (data sources, licences, attributions).

    Returns:
      The path of ``fingerprints.json``.

    Raises:
      ValueError: if a file lies outside ``folder``.
    """
    folder = Path(folder).resolve()
    record = {}
    for f in files:
        path = (folder / f).resolve()
        if folder not in path.parents:
            raise ValueError(f"{f} is not inside the model folder {folder}.")
        record[path.relative_to(folder).as_posix()] = sha256_file(path)
    body = {"algorithm": "sha256", "files": dict(sorted(record.items())), **(extra or {})}
    target = folder / FINGERPRINTS
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def verify_fingerprints(folder: str | Path) -> dict[str, str]:
    """Check every file recorded in ``folder/fingerprints.json`` against its sha256.

    Returns:
      The recorded ``{relative path: sha256}``.

    Raises:
      FingerprintError: the record is missing or unreadable, a file is missing, or a file's
        digest differs (one line, naming the file and both digests).
    """
    folder = Path(folder)
    record_path = folder / FINGERPRINTS
    remedy = "retrain with `resurgence bridge realworld train` or restore the original files"
    try:
        files = json.loads(record_path.read_text())["files"]
    except FileNotFoundError:
        raise FingerprintError(
            f"no {FINGERPRINTS} in {folder}: the weights cannot be verified; {remedy}."
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise FingerprintError(
            f"{record_path} is not a fingerprint record (no 'files' map); {remedy}."
        ) from None
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            raise FingerprintError(
                f"{rel} is listed in {record_path} but missing from {folder}; {remedy}."
            )
        found = sha256_file(path)
        if found != expected:
            raise FingerprintError(
                f"{rel} in {folder} does not match its fingerprint (sha256 {found[:16]}..., "
                f"recorded {expected[:16]}...): it changed after training; {remedy}."
            )
    return dict(files)
