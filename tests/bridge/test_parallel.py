"""Two gloo CPU processes give the same eigenvalues as one process."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

CASE = {
    "seed": 0,
    "unet": {"sample_size": 8},
    "group": r"down_blocks\.0\..*attn2\.to_k\.",
    "dtype": torch.float64,
    "batches": 3,
    "batch_size": 1,
}


def _worker(rank, world, init, out):
    torch.set_num_threads(1)
    from bridge.parallel import distributed_hessian, init_distributed
    from bridge.spectra import top_eigenpairs
    from tests.bridge.conftest import build_case

    init_distributed("gloo", init_method=init, rank=rank, world_size=world)
    _, _, loss = build_case(CASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = distributed_hessian(loss)
        vals = top_eigenpairs(op, 2, which="SA", tol=0).eigenvalues
        grad = op.gradient()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"vals": vals.tolist(), "grad": grad.tolist(), "local": op.batch_indices}, f)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    from bridge.curvature import HessianOperator
    from bridge.spectra import top_eigenpairs
    from tests.bridge.conftest import build_case

    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdv'}", out), nprocs=2, join=True)
    results = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert results[0]["local"] == [0, 2] and results[1]["local"] == [1]
    _, _, loss = build_case(CASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(loss)
        expected = top_eigenpairs(op, 2, which="SA", tol=0).eigenvalues
    for res in results:
        # Summation order differs (2 partial sums), so agreement is to float64 round-off.
        np.testing.assert_allclose(res["vals"], expected, rtol=1e-10)
        np.testing.assert_allclose(res["grad"], loss.gradient().numpy(), rtol=1e-10, atol=1e-16)


def test_shard_indices_error():
    from bridge.parallel import shard_indices

    assert sorted(shard_indices(5, 0, 2) + shard_indices(5, 1, 2)) == list(range(5))
    with pytest.raises(ValueError, match=r"`rank`=2 must be in \[0, 2\)"):
        shard_indices(5, 2, 2)
