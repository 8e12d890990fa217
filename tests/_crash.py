"""kill -9 a command at a seeded random point of its progress (shared by the crash-safety tests).

The point is chosen from what the run itself writes: ``progress()`` counts finished units (sweep
chunks, fine-tuning checkpoints). The duration of one unit is measured as the time between the
first two units, then the command is killed a random fraction of a unit after the ``k``-th,
with ``k`` and the fraction drawn from a seeded ``random.Random``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the console script ``resurgence`` is ``experiments.cli:app``; this runs the same entry point
#: without depending on where the script was installed.
RESURGENCE = [sys.executable, "-c", "from experiments.cli import app; app(prog_name='resurgence')"]
_POLL_S = 0.002


@dataclasses.dataclass(frozen=True)
class Kill:
    """Where the kill landed: after ``units_before`` units (the ``k`` aimed at), ``delay_s``
    into the next one (``fraction`` of the measured ``unit_s``); ``units_at_kill`` were done."""

    units_before: int
    fraction: float
    unit_s: float
    delay_s: float
    units_at_kill: int


def env() -> dict[str, str]:
    """The test's environment for the commands: CPU JAX, offline hubs, one BLAS/OpenMP thread
    (the machine is shared, and a fixed thread count keeps the reductions' order fixed)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )


def start(args: Sequence[str], log: Path) -> subprocess.Popen:
    """Start ``resurgence ARGS`` with output to ``log`` (a file: a full pipe would block it)."""
    handle = open(log, "wb")  # the child holds its own copy of the descriptor
    proc = subprocess.Popen([*RESURGENCE, *args], cwd=REPO, env=env(), stdout=handle, stderr=handle)
    handle.close()
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for ``proc``; return its output, or fail with its tail if it did not succeed."""
    proc.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-4000:]}"
    return text


def run(args: Sequence[str], log: Path, timeout: float = 300) -> str:
    """Run ``resurgence ARGS`` to completion and return its output."""
    return finish(start(args, log), log, timeout)


def kill_at_random_point(
    proc: subprocess.Popen,
    log: Path,
    progress: Callable[[], int],
    total: int,
    rng: random.Random,
    timeout: float = 300,
) -> Kill:
    """SIGKILL ``proc`` a random fraction of a unit after a random number ``k`` of units.

    ``k`` is drawn from ``2 .. total - 1`` (the first two units time one unit; at least one is
    still to come), so the kill lands while the run is computing or writing, not after it.

    Raises:
      AssertionError: if the command ends by itself before the kill (its output is shown).
    """
    assert total >= 3, "need >= 3 units: two to time one, one still running at the kill"
    units_before, fraction = rng.randint(2, total - 1), rng.random()
    deadline = time.monotonic() + timeout

    def wait_for(n: int) -> float:
        while progress() < n:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the command ended (exit {proc.returncode}) before unit {n} of {total}:\n"
                    + log.read_text(errors="replace")[-4000:]
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"unit {n} of {total} not reached in {timeout} s")
            time.sleep(_POLL_S)
        return time.monotonic()

    first = wait_for(1)
    unit_s = wait_for(2) - first
    wait_for(units_before)
    delay = fraction * unit_s
    time.sleep(delay)
    assert proc.poll() is None, (
        f"the command finished before the kill (after unit {units_before} + {delay:.3f} s); "
        "a unit is now much faster than the first ones"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return Kill(units_before, fraction, unit_s, delay, progress())
