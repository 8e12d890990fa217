"""Numerics set once for the whole suite and the doctests (style.md s.7): float64 JAX, offline hubs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from theory._backend import init_backend_without_lapack_deadlock  # noqa: E402

# Two xdist workers on two cores: one intra-op thread each, and no batched-LAPACK deadlock; the
# threads are free to run on either core afterwards.
init_backend_without_lapack_deadlock()
