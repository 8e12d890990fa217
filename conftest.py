"""Numerics set once for the whole suite and the doctests (style.md s.7): float64 JAX, offline hubs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from theory._backend import cpu_of_slot, init_backend_without_lapack_deadlock  # noqa: E402

# Two xdist workers on two cores: one intra-op thread each, and no batched-LAPACK deadlock. Each
# worker's pool thread gets a CPU of its own (gw0 the first, gw1 the second, ...), or both would
# run their XLA work on the lowest CPU.
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
init_backend_without_lapack_deadlock(cpu_of_slot(_worker))
