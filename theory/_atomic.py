"""Atomic file and folder writes: a reader finds the old complete file, the new one, or none.

Every file the package writes goes through :func:`atomic_write`: the content is written to a
temporary name in the destination's folder, flushed and fsync'ed, then renamed over the
destination with :func:`os.replace` (atomic on POSIX and Windows within one file system), and
the folder entry is fsync'ed. A process killed at any moment (SIGKILL, power loss after the
fsync) therefore never leaves a half-written file under the real name, and resume logic that
trusts "the file exists" is sound. Folders written by libraries (``save_pretrained``) go
through :func:`atomic_directory` the same way.

It lives in ``theory`` because that is the root of the import graph (``bridge`` and
``experiments`` both import ``theory``; neither may be imported from here) and it imports
neither JAX nor torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_directory",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "remove_partial_writes",
]

# ".results.nc.3f9a0c1b2d4e.partial.nc": hidden, recognisable, and it keeps the destination's
# suffix, because some writers infer the format from it (savefig) or append it (np.savez).
_PARTIAL = re.compile(r"^\..+\.[0-9a-f]{12}\.partial(\.[^.]+)?$")


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial{path.suffix}")


def _fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a folder entry, so the data and the rename survive a crash."""
    if not path.is_dir():
        fd = os.open(path, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) refuse it; the data itself is synced
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file atomically: ``write(tmp)`` creates the complete file at ``tmp``.

    ``tmp`` is a hidden name in ``path``'s folder with ``path``'s suffix. After ``write``
    returns, ``tmp`` is fsync'ed and renamed over ``path``; if ``write`` raises (disk full,
    interrupt), ``tmp`` is removed and ``path`` is untouched.

    Args:
      path: destination file; its folder is created if missing.
      write: callable taking the temporary path, e.g. ``lambda p: torch.save(obj, p)`` or
        ``lambda p: ds.to_netcdf(p, engine="h5netcdf")``.

    Returns:
      ``path`` as a ``Path``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = atomic_write(folder / "a.txt", lambda p: p.write_text("new"))
    >>> (folder / "a.txt").read_text(), [p.name for p in folder.iterdir()]
    ('new', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text`` (newlines written as given, on every OS)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """:func:`atomic_write` of ``obj`` as 2-space indented JSON with a final newline.

    Values JSON cannot represent are written with ``str`` (paths, dtypes).
    """
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder atomically: write into the yielded temporary folder; on exit it replaces
    ``path`` (a previous folder there is discarded only once the new one is complete).

    A kill inside the block leaves ``path`` as it was. ``rename(2)`` cannot replace a non-empty
    folder, so an old one is first renamed aside: a kill between the two renames leaves
    ``path`` absent (never half-written) and the old folder under a hidden partial name, which
    :func:`remove_partial_writes` clears.

    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> with atomic_directory(parent / "unet") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> [p.name for p in parent.iterdir()], (parent / "unet" / "config.json").read_text()
    (['unet'], '{}')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root))
        aside = None
        if path.exists() or path.is_symlink():
            aside = _partial_name(path)
            os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside, path)
            raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(path.parent)
    if aside is not None:
        _remove(aside)


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder`` (not its sub-folders).

    Only names of the form this module creates are touched. Call it when this process owns
    ``folder`` (e.g. on resume), never while another process may be writing there.

    Returns:
      The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if _PARTIAL.match(p.name)]
    for p in removed:
        _remove(p)
    return removed
