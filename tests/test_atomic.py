"""Atomic writes: a writer killed at any point leaves the old complete file or the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import theory._atomic as atomic
from theory._atomic import (
    atomic_directory,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    remove_partial_writes,
)

REPO = Path(__file__).resolve().parents[1]


class _Killed(BaseException):
    """Stands for the process dying at the patched point (not an Exception: nothing catches it)."""


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_death_between_write_and_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"version": "old"})
    old = path.read_bytes()

    def die(src, dst):
        assert Path(src).read_text() == '{\n  "version": "new"\n}\n'  # fully written, fsync'ed
        raise _Killed

    monkeypatch.setattr(atomic.os, "replace", die)
    with pytest.raises(_Killed):
        atomic_write_json(path, {"version": "new"})
    assert path.read_bytes() == old
    assert _names(tmp_path) == ["results.json"]  # the temporary was removed on the way out
    monkeypatch.undo()
    atomic_write_json(path, {"version": "new"})
    assert path.read_text() == '{\n  "version": "new"\n}\n'


def test_death_in_the_middle_of_a_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "chunk.npz"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old complete"))

    def half_then_die(tmp: Path) -> None:
        assert tmp.parent == path.parent and tmp.suffix == ".npz"  # same folder, same suffix
        tmp.write_bytes(b"new, but only ha")
        raise _Killed

    with pytest.raises(_Killed):
        atomic_write(path, half_then_die)
    assert path.read_bytes() == b"old complete" and _names(tmp_path) == ["chunk.npz"]


def test_sigkill_mid_write_leaves_the_old_file_and_a_removable_temporary(tmp_path):
    path, ready = tmp_path / "checkpoint.pt", tmp_path / "ready"
    atomic_write_text(path, "old complete")
    # user files that merely look temporary must survive remove_partial_writes
    keep = ["notes.partial.txt", ".hidden", ".checkpoint.pt.partial.pt", "a.0123456789ab.partial"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from theory._atomic import atomic_write

        def half(tmp):
            with open(tmp, "wb") as f:
                f.write(b"new, but only ha")
                f.flush()
                Path({str(ready)!r}).touch()
                time.sleep(120)  # killed here, the file half written
                f.write(b"lf of it")

        atomic_write({str(path)!r}, half)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old complete"
    partial = [p for p in tmp_path.iterdir() if p.name not in {*keep, "checkpoint.pt", "ready"}]
    assert len(partial) == 1 and partial[0].read_bytes() == b"new, but only ha", partial
    assert partial[0].name.startswith(".checkpoint.pt.") and partial[0].suffix == ".pt"
    assert remove_partial_writes(tmp_path) == partial
    assert _names(tmp_path) == sorted([*keep, "checkpoint.pt", "ready"])


def test_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsync'ed descriptors")
    monkeypatch.setattr(atomic.os, "fsync", record_fsync)
    monkeypatch.setattr(atomic.os, "replace", record_replace)
    path = atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    (_, synced), (_, src, dst), (_, folder) = events
    assert synced == src and dst == str(path) and folder == str(tmp_path)
    assert Path(src).parent == tmp_path and Path(src).name.startswith(".config.toml.")


def test_atomic_directory_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    unet = tmp_path / "unet"
    with atomic_directory(unet) as tmp:
        (tmp / "config.json").write_text("old")
        (tmp / "weights.safetensors").write_text("old")
    with pytest.raises(_Killed), atomic_directory(unet) as tmp:  # killed while saving
        (tmp / "config.json").write_text("new")
        raise _Killed
    assert _names(unet) == ["config.json", "weights.safetensors"]
    assert (unet / "config.json").read_text() == "old" and _names(tmp_path) == ["unet"]

    calls = []

    def second_rename_fails(src, dst):  # the old folder is moved aside, then moving in fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        os.rename(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"), atomic_directory(unet) as tmp:
        (tmp / "config.json").write_text("new")
    monkeypatch.undo()
    assert (unet / "config.json").read_text() == "old" and _names(tmp_path) == ["unet"]

    with atomic_directory(unet) as tmp:
        (tmp / "config.json").write_text("new")
    assert _names(unet) == ["config.json"] and (unet / "config.json").read_text() == "new"
    assert _names(tmp_path) == ["unet"]  # the old folder, moved aside, is gone
