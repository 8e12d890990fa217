"""One place that starts JAX's CPU backend safely on small machines.

jaxlib 0.10's batched LAPACK kernels (eigh, LU, SVD) split a large batch over the intra-op thread
pool and block until it finishes; when two such kernels run as concurrent thunks they can take
every pool thread and wait on each other forever (seen on 2 cores with a 255-configuration sweep
chunk, confirmed in gdb). With a one-thread pool the kernels run inline. jaxlib reads the pool
size from the CPU affinity when the client is created, so the affinity is narrowed for that
moment only. Called by the CLI, the sweep engine, the benchmarks and the test suite; a library
user who drives big vmapped eigh batches on few cores can call it before any JAX operation.
"""

from __future__ import annotations

import os

__all__ = ["init_backend_without_lapack_deadlock"]


def init_backend_without_lapack_deadlock() -> None:
    """Create JAX's CPU client with a one-thread intra-op pool (no effect once JAX is initialised)."""
    import jax
    from jax._src import xla_bridge  # no public "is the backend up" query exists

    if xla_bridge.backends_are_initialized() or not hasattr(os, "sched_setaffinity"):
        return
    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        jax.devices()
    finally:
        os.sched_setaffinity(0, cpus)
