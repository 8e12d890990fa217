"""One place that starts JAX's CPU backend safely on small machines, and picks compile effort.

jaxlib 0.10's batched LAPACK kernels (eigh, LU, SVD) split a large batch over the intra-op thread
pool and block until it finishes; when two such kernels run as concurrent thunks they can take
every pool thread and wait on each other forever (seen on 2 cores with a 255-configuration sweep
chunk, confirmed in gdb). With a one-thread pool the kernels run inline. jaxlib reads the pool
size from the CPU affinity when the client is created, so the affinity is narrowed for that
moment only. Source: jaxlib/cpu/lapack_kernels.cc ``ParallelBatchMap`` (jax commit bfd9e1f, in
0.10.0-0.11.0); jax commit 8599924 (after 0.11.0) stops open-source builds from splitting LAPACK
batches, so with a release that has it this guard can go and XLA gets every core back. Re-checked
on 2026-12-06 with jaxlib 0.10.2: JAX's default client hangs on ``benchmarks.bench_sweep``'s
500-configuration problem-axes workload.

Called by the CLI, the sweep engine, the benchmarks and the test suite; a library user who drives
big vmapped eigh batches on few cores can call it before any JAX operation.
"""

from __future__ import annotations

import os

__all__ = [
    "init_backend_without_lapack_deadlock",
    "FAST_COMPILE_OPTIONS",
    "SWEEP_COMPILE_OPTIONS",
    "FAST_COMPILE_MAX_CONFIGURATIONS",
    "compiles_fast",
]


def init_backend_without_lapack_deadlock(cpu: int | None = None) -> None:
    """Create JAX's CPU client with a one-thread intra-op pool (no effect once JAX is initialised).

    The client's threads are created while the affinity is narrowed (Linux: a thread inherits
    its creator's affinity) and get the process's full affinity back afterwards, with the calling
    thread, so the one-thread pool is not tied to one core.

    Args:
      cpu: the CPU the client is created on (default: the lowest this process may use).
    """
    import jax
    from jax._src import xla_bridge  # no public "is the backend up" query exists

    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = os.sched_getaffinity(0)
    if cpu is not None and cpu not in cpus:
        raise ValueError(f"`cpu` {cpu} is not one this process may use: {sorted(cpus)}.")
    if xla_bridge.backends_are_initialized():
        return
    before = _thread_ids()
    try:
        os.sched_setaffinity(0, {min(cpus) if cpu is None else cpu})
        jax.devices()
    finally:
        os.sched_setaffinity(0, cpus)
        # The threads the client started inherited the one-CPU affinity; give them the process's
        # CPUs back (the pool keeps its one thread: its size was read at creation). Pinned, every
        # XLA thread of the process shared one core: predict_rho ran at 3.1e5 evaluations/s
        # against 4.3e5 unpinned on 2 cores.
        for tid in _thread_ids() - before:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread has exited
                pass


def _thread_ids() -> set[int]:
    """This process's thread ids (Linux; empty where /proc is absent)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


# XLA's LLVM optimisation level 0 for programs that run for less than they take to compile: on
# the default figure sweeps it compiled 2.4x faster and ran 2.3x slower (same results to
# round-off), so it halves a cold `resurgence figures`. XLA CPU's newer fusion emitters off as
# well: the curves figure's programs compiled in 1.6-2.0 s instead of 5.9 s (cold figures 37 ->
# 25 s on 2 cores); at O2 they made no difference to the law's throughput. Passed per function
# (jax.jit's ``compiler_options``), never process-wide.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Every other sweep stage (O2): the fusion emitters off too. The knobs figure's grid with seeds
# 0..23 (3,888 configurations, float64, cold) took 11.6-12.0 s instead of 15.9-16.1 s, results
# equal to 1.4e-15; the issue-12 bench workload compiled 0.6 s faster and ran as fast.
SWEEP_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# Configurations below which a sweep compiles fast: at O2 a stage compiles in ~5 s and runs
# ~2.5 ms a configuration on 2 cores, so O0 (~1.5 s compile, ~2.3x the run time) wins up to
# about 2,000 configurations a stage.
FAST_COMPILE_MAX_CONFIGURATIONS = 2000


def compiles_fast(configurations: int) -> bool:
    """Whether a program that will evaluate ``configurations`` configurations should be compiled
    with :data:`FAST_COMPILE_OPTIONS` (compiling dominates its run time)."""
    return configurations <= FAST_COMPILE_MAX_CONFIGURATIONS
