"""Data-parallel gradients and Hessian-vector products over the probe batches.

Each process holds the whole (frozen) loss but evaluates only its share of the probe batches;
the partial sums are all-reduced, so every process sees the same H v and runs an identical
Lanczos iteration. Launch with ``torchrun --nproc_per_node N`` or ``accelerate launch`` (both set
RANK / WORLD_SIZE / MASTER_ADDR), then call :func:`init_distributed`; the gloo backend works on
CPU, nccl on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bridge.curvature import HessianOperator, HvpMethod
from bridge.loss import FrozenDiffusionLoss

__all__ = ["distributed_hessian", "init_distributed", "shard_indices"]


def init_distributed(
    backend: str | None = None,
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[int, int]:
    """Initialise torch.distributed once (from the launcher's environment by default).

    Args:
      backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default nccl when CUDA is available.
      init_method, rank, world_size: explicit rendezvous (e.g. ``file://...`` in tests).

    Returns:
      ``(rank, world_size)``.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kwargs = (
            {}
            if init_method is None
            else {"init_method": init_method, "rank": rank, "world_size": world_size}
        )
        dist.init_process_group(backend, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def shard_indices(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Round-robin share of batch indices for ``rank`` (every batch on exactly one process).

    Raises:
      ValueError: if rank is not in [0, world_size).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank`={rank} must be in [0, {world_size})")
    return list(range(rank, num_batches, world_size))


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def distributed_hessian(
    loss: FrozenDiffusionLoss,
    theta: torch.Tensor | None = None,
    *,
    method: HvpMethod = "graph-reuse",
    fd_step: float | None = None,
    graph_memory_limit: float | None = None,
    check_deterministic: bool = True,
    progress: bool = False,
) -> HessianOperator:
    """A :class:`HessianOperator` over this process's batches whose products are all-reduced.

    Under ``graph-reuse`` each process retains the first-order graphs of its own batches only,
    so the graph memory per process falls with the number of processes.

    Args:
      loss: the same frozen loss on every process (same seed -> same batches).
      theta: flat parameters ``(n,)``.
      method, fd_step, graph_memory_limit, check_deterministic, progress: as for
        :class:`HessianOperator`.

    Returns:
      The operator; ``op @ v`` and ``op.gradient()`` equal the single-process results.

    Raises:
      RuntimeError: if torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call bridge.parallel."
            "init_distributed() inside torchrun / accelerate launch"
        )
    indices = shard_indices(len(loss.batches), dist.get_rank(), dist.get_world_size())
    return HessianOperator(
        loss,
        theta,
        method=method,
        fd_step=fd_step,
        graph_memory_limit=graph_memory_limit,
        check_deterministic=check_deterministic,
        batch_indices=indices,
        all_reduce=_all_reduce_sum,
        progress=progress,
    )
