"""kill -9 a `resurgence theory sweep` at a seeded random point: the rerun of the same command
gives, bitwise, the results of an uninterrupted run, and no damaged chunk is ever trusted."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import xarray as xr

from experiments.sweep import _EXTRA_DIMS, RESULTS_NAME, _chunk_done, _chunk_path, _save_chunk
from tests._crash import finish, kill_at_random_point, run, start

# One group (method and optimizer fixed), 24 configurations (12 problems x 2 lrs) in 12 chunks of
# one problem with its 2 lrs. Simulated GD for
# 10^4 steps makes a chunk ~0.1 s here, long enough to land a kill inside one; compile and the
# eager checks (~15 s a run) dominate the test's time.
CONFIG = """
name = "kill_test"
chunk_size = 2
steps = [0, 10, 100, 1000, 10000]
truncation_ranks = [1]

[params]
dim = 16
embed_dim = 8
num_concepts = 5
num_levels = 3
finetune = "other_concepts"
method = "uce"
optimizer = "gd"

[axes]
seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
lr = [0.1, 0.3]
"""
N_CHUNKS = 12


@pytest.mark.slow
def test_sweep_killed_at_random_and_rerun_equals_an_uninterrupted_run(tmp_path):
    config = tmp_path / "kill_test.toml"
    config.write_text(CONFIG)

    def command(out):
        return ["theory", "sweep", str(config), "--out", str(out), "--no-progress"]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    chunks = killed / "chunks"
    # the uninterrupted run goes alongside the one that is killed (same command, other folder)
    ref_proc = start(command(reference), tmp_path / "reference.log")
    proc = start(command(killed), tmp_path / "killed.log")
    kill = kill_at_random_point(
        proc,
        tmp_path / "killed.log",
        lambda: len(list(chunks.glob("g*.npz"))) if chunks.is_dir() else 0,
        N_CHUNKS,
        random.Random(9),
    )
    finish(ref_proc, tmp_path / "reference.log")
    print(kill)  # where it landed (shown with -rP, and on failure)

    left = sorted(chunks.glob("g*.npz"))  # what the kill left under real names: complete files
    assert kill.units_before <= len(left) == kill.units_at_kill, kill
    for path in left:
        with np.load(path) as chunk:
            assert set(chunk.files) == set(_EXTRA_DIMS)
            assert all(chunk[name].shape[0] == 2 for name in chunk.files)
    assert not (killed / RESULTS_NAME).exists() or len(left) == N_CHUNKS

    output = run(command(killed), tmp_path / "rerun.log")
    assert "results.nc" in output
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["chunks_total"] == N_CHUNKS and manifest["chunks_resumed"] == len(left), kill
    assert not [p for p in killed.rglob("*") if ".partial" in p.name]  # temporaries cleared

    want = xr.load_dataset(reference / RESULTS_NAME, engine="h5netcdf")
    got = xr.load_dataset(killed / RESULTS_NAME, engine="h5netcdf")
    xr.testing.assert_identical(got, want)  # coordinates and attributes too
    for name in want.data_vars:  # bitwise: every chunk runs the same program on the same inputs
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].values.tobytes() == want[name].values.tobytes(), (name, kill)
    assert np.isfinite(want["rho"].values).all() and np.abs(want["rho"].values).max() > 0


def test_a_damaged_chunk_is_recomputed_not_trusted(tmp_path):
    arrays = {name: np.zeros((2,) + (1,) * len(extra)) for name, extra in _EXTRA_DIMS.items()}
    _save_chunk(tmp_path, 0, 0, 0, arrays)
    _save_chunk(tmp_path, 0, 0, 1, arrays)
    _save_chunk(tmp_path, 0, 0, 2, {k: v for k, v in arrays.items() if k != "rho"})
    assert _chunk_done(tmp_path, 0, 0, 0) and not _chunk_done(tmp_path, 0, 0, 3)  # 3: not written
    assert not _chunk_done(tmp_path, 0, 1, 0)  # another variant's chunk 0 is another file
    cut = _chunk_path(tmp_path, 0, 0, 1)
    cut.write_bytes(cut.read_bytes()[:-100])  # a copy cut short (not something we write)
    for chunk in (1, 2):
        path = _chunk_path(tmp_path, 0, 0, chunk)
        with pytest.warns(UserWarning, match=re.escape(f"sweep chunk {path} is damaged")):
            assert not _chunk_done(tmp_path, 0, 0, chunk)
        assert not path.exists()  # removed, so the resume recomputes it
    assert _chunk_done(tmp_path, 0, 0, 0)
