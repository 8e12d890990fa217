"""Run a sweep config: vmapped, sharded over devices, chunked, resumable, with a manifest.

The grid splits into *groups* (one per combination of static parameters: sizes, fine-tuning set)
and each group into *variants* (one per code choice: method, optimizer, number of erased
concepts), so a configuration runs only its own code (trace-time dispatch). Inside a variant the
configurations factor into distinct *problems* (every knob but lr) times the learning rates.
Jitted stages do the work: :func:`theory.sweep.prepare_grid`'s three parts prepare each problem
once (problem and theta_0, compiled per sizes; the unlearning, per method and erased count; the
fine-tuning setup and Hessian eigendecomposition, shared by every method), shared by the
variants that differ only in the optimizer; :func:`theory.sweep.observe_grid` (compiled per
optimizer) evaluates every lr from it. A chunk is a fixed number of problems (the last one
padded) with all their learning rates, sharded over a 1-D device mesh on the problem axis; the
results are scattered back to the grid's order. Every finished chunk is saved to ``OUT/chunks/``
before the next starts, so a rerun after an interruption skips it and the assembled results are
identical. Every file is written atomically (:mod:`theory._atomic`), so a chunk that exists is
complete even after kill -9.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from experiments.config import PARAMS, ConfigError, SweepConfig
from theory._atomic import atomic_write, remove_partial_writes
from theory._backend import compiles_fast, init_backend_without_lapack_deadlock
from theory._manifest import write_manifest

__all__ = ["run_sweep", "RESULTS_NAME", "SweepPlan", "sweep_plan", "enable_compilation_cache"]

RESULTS_NAME = "results.nc"
CONFIG_NAME = "config.toml"
# Extra (non-grid) dims of each output variable, after the configuration axis.
_EXTRA_DIMS = {
    "rho": ("steps",),
    "predicted_rho": ("steps",),
    "predicted_rho_truncated": ("rank", "steps"),
    "forget_loss_recovery": ("steps",),
    "presence": ("steps",),
    "presence_before": (),
    "incidental_presence": ("stage", "prompt"),
    "curvature_along_delta": (),
    "lambda_max": (),
    "spectral_weights": ("level", "eigen"),
    "hessian_eigenvalues": ("level", "eigen"),
    "principal_angles": ("forget_direction",),
}

# Code choices: one compiled function (a variant) per value; ScenarioStatic field names.
_VARIANT_PARAMS = ("method", "optimizer", "num_erased")
_LAW_PARAM = "lr"


def enable_compilation_cache(folder=None) -> None:
    """Turn on JAX's persistent compilation cache (reruns skip the XLA compile, most of a small
    sweep's time). Folder: ``folder``, else $RESURGENCE_JAX_CACHE, else ~/.cache/resurgence/jax."""
    import jax

    path = (
        folder
        or os.environ.get("RESURGENCE_JAX_CACHE")
        or Path.home() / ".cache" / "resurgence" / "jax"
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """How a config's grid factors into groups, variants, problems and learning rates.

    The dataset layout is ``static_axes + dynamic_axes + extra dims``; configurations are numbered
    in C order over ``dynamic_axes``. ``variants`` lists the method, optimizer and num_erased of
    each variant (dicts); ``problem_knobs`` holds each :data:`theory.sweep.PROBLEM_KNOBS` knob
    for every problem ``(P,)``, the same in every variant; ``lrs`` ``(R,)``;
    ``config_index[v, p, r]`` is the configuration number of variant v, problem p, step size r.
    """

    static_axes: list
    groups: list
    dynamic_axes: list
    variants: list
    problem_knobs: dict
    lrs: np.ndarray
    config_index: np.ndarray

    @property
    def n_configs(self) -> int:
        return self.config_index.size


def sweep_plan(config: SweepConfig) -> SweepPlan:
    """Factor the grid of ``config`` (no computation; see :class:`SweepPlan`)."""
    from theory.sweep import INT_KNOBS, PROBLEM_KNOBS

    static_axes = [n for n in config.axes if PARAMS[n].static]
    dynamic_axes = [n for n in config.axes if not PARAMS[n].static]
    groups = list(itertools.product(*(config.axis_values(n) for n in static_axes)))

    def values(name):
        return list(config.axis_values(name)) if name in config.axes else [config.value(name)]

    variant_axes = [n for n in dynamic_axes if n in _VARIANT_PARAMS]
    problem_axes = [n for n in dynamic_axes if n in PROBLEM_KNOBS]
    # in the order of the axes (C order over the variant axes), as dicts of ScenarioStatic fields
    variants = [
        {**{n: config.value(n) for n in _VARIANT_PARAMS}, **dict(zip(variant_axes, v, strict=True))}
        for v in itertools.product(*(config.axis_values(n) for n in variant_axes))
    ]
    # configuration numbers, axes reordered to (variant axes, problem axes, lr)
    order = variant_axes + problem_axes + [n for n in dynamic_axes if n == _LAW_PARAM]
    shape = [len(config.axis_values(n)) for n in dynamic_axes]
    numbers = np.arange(int(np.prod(shape))).reshape(shape)
    numbers = numbers.transpose([dynamic_axes.index(n) for n in order])
    n_problems = int(np.prod([len(config.axis_values(n)) for n in problem_axes]))
    lrs = np.asarray(values(_LAW_PARAM), dtype=np.float64)
    config_index = numbers.reshape(len(variants), n_problems, lrs.size)
    lengths = [len(config.axis_values(n)) for n in problem_axes]
    mesh = np.meshgrid(*(np.arange(k) for k in lengths), indexing="ij")
    problem_knobs = {}
    for name in PROBLEM_KNOBS:
        dtype = np.int64 if name in INT_KNOBS else np.float64
        if name in problem_axes:
            positions = mesh[problem_axes.index(name)].reshape(-1)
            column = np.asarray(config.axis_values(name))[positions]
        else:
            column = np.full(n_problems, config.value(name))
        problem_knobs[name] = column.astype(dtype)
    return SweepPlan(
        static_axes, groups, dynamic_axes, variants, problem_knobs, lrs, config_index
    )


def _static_for(config: SweepConfig, plan: SweepPlan, group: int, variant: int):
    from theory.sweep import ScenarioStatic

    fields = {
        f: config.value(f) for f in ("dim", "embed_dim", "num_concepts", "num_levels", "finetune")
    }
    fields.update(dict(zip(plan.static_axes, plan.groups[group], strict=True)))
    fields.update(plan.variants[variant])
    max_erased = max(
        config.axis_values("num_erased") if "num_erased" in config.axes
        else [config.value("num_erased")]
    )
    return ScenarioStatic(
        steps=tuple(config.steps),
        truncation_ranks=tuple(config.truncation_ranks),
        max_erased=max_erased,
        **fields,
    )


@functools.lru_cache(maxsize=8)
def _shardings(devices: tuple):
    """(problem-axis sharding, replicated) on a 1-D mesh over ``devices``."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("config",))
    return NamedSharding(mesh, PartitionSpec("config")), NamedSharding(mesh, PartitionSpec())


@functools.lru_cache(maxsize=64)
def _jitted(stage: str, part, devices: tuple, fast_compile: bool = False):
    """One jitted stage per (stage, static part, devices, compile effort), kept across runs in
    this process; ``fast_compile``: XLA optimisation level 0 (:mod:`theory._backend`)."""
    import jax

    from theory._backend import FAST_COMPILE_OPTIONS, SWEEP_COMPILE_OPTIONS
    from theory.sweep import base_grid, finish_grid, observe_grid, unlearn_grid

    sharding, replicated = _shardings(devices)
    stages = {
        "base": (lambda knobs: base_grid(part, knobs), (sharding,)),
        "unlearn": (lambda base: unlearn_grid(part, base), (sharding,)),
        "finish": (
            lambda knobs, base, theta_u, directions: finish_grid(
                part, knobs, base, theta_u, directions
            ),
            (sharding,) * 4,
        ),
        "observe": (lambda states, lrs: observe_grid(part, states, lrs), (sharding, replicated)),
    }
    fn, shardings = stages[stage]
    fn.__name__ = f"sweep_{stage}"  # names the compile in JAX's logs and profiles
    options = dict(FAST_COMPILE_OPTIONS if fast_compile else SWEEP_COMPILE_OPTIONS)
    return jax.jit(
        fn, in_shardings=shardings, out_shardings=sharding, compiler_options=options
    )


class _Compiled:
    """The jitted stages of one run, sharded on the problem axis; counts distinct ones.

    Preparing a chunk runs three of them: the problem and theta_0 (compiled once per sizes), the
    unlearning (once per method and erased count) and the fine-tuning setup with its Hessian
    eigendecomposition (once per sizes, fine-tuning set and erased count), so that a grid over
    methods compiles the shared work once: compiling all of it per method took most of a cold
    figure's time (5-9 s a method).
    """

    def __init__(self, devices, fast_compile: bool = False):
        self.devices = tuple(devices)
        self.fast_compile = fast_compile
        self.sharding, self.replicated = _shardings(self.devices)
        self.used = set()

    def _stage(self, stage, part):
        key = (stage, part, self.devices)
        self.used.add(key)
        return _jitted(*key, self.fast_compile)

    def prepare(self, static):
        base = self._stage("base", static.for_base())
        unlearn = self._stage("unlearn", static.for_unlearn())
        finish = self._stage("finish", static.for_finish())

        def run(knobs):
            prepared = base(knobs)
            return finish(knobs, prepared, *unlearn(prepared))

        return run

    def observe(self, static):
        return self._stage("observe", static.for_observables())

    @property
    def count(self) -> int:
        return len(self.used)


def _prepare_folder(out: Path, config: SweepConfig, force: bool) -> None:
    saved = out / CONFIG_NAME
    if saved.exists() and saved.read_text() != config.to_toml():
        if not force:
            raise ConfigError(
                f"Output folder {str(out)!r} holds a run of a different config "
                f"(saved {CONFIG_NAME} differs from {config.name!r}, hash {config.hash()}). "
                "Pass --force to discard it, or choose another --out."
            )
        shutil.rmtree(out / "chunks", ignore_errors=True)
        for name in (RESULTS_NAME, "manifest.json"):
            (out / name).unlink(missing_ok=True)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "chunks"):  # temporaries of a killed run (never a finished file)
        remove_partial_writes(folder)
    config.save(saved)


def run_sweep(
    config: SweepConfig, out, *, force: bool = False, progress: bool = True, devices=None
):
    """Run (or resume) ``config`` into folder ``out`` and return the results as an xarray Dataset.

    Args:
      config: a validated :class:`SweepConfig`.
      out: output folder: ``config.toml``, ``chunks/``, ``results.nc``, ``manifest.json``.
      force: discard a run of a different config found in ``out``.
      progress: show a tqdm bar (chunks done, time left).
      devices: JAX devices to shard over (default: all of the default backend).

    Raises:
      ConfigError: ``out`` holds a different config and ``force`` is False.
    """
    import jax
    import xarray as xr
    from tqdm.auto import tqdm

    from theory.sweep import check_unlearning

    start = time.perf_counter()
    init_backend_without_lapack_deadlock()
    out = Path(out)
    _prepare_folder(out, config, force)
    devices = list(jax.devices() if devices is None else devices)
    plan = sweep_plan(config)
    n_problems, n_lrs = plan.config_index.shape[1:]
    n_dev = len(devices)
    # A chunk: the same number of problems per device (all their lrs), about chunk_size
    # configurations; every device then runs the same program on the same shapes whatever the
    # device count, so results are identical on 1 or N devices.
    per_device = min(max(1, config.chunk_size // n_lrs), -(-n_problems // n_dev))
    chunk = per_device * n_dev
    n_chunks = -(-n_problems // chunk)
    todo = [
        (g, v, c)
        for g in range(len(plan.groups))
        for v in range(len(plan.variants))
        for c in range(n_chunks)
    ]
    finished = {key for key in todo if _chunk_done(out, *key)}
    done = resumed = len(finished)
    # a small grid runs for less time than it compiles: compile it fast (theory/_backend.py)
    fast_compile = compiles_fast(plan.config_index.size)
    compiled = _Compiled(devices, fast_compile)
    lrs = jax.device_put(plan.lrs, compiled.replicated)
    with tqdm(
        total=len(todo), initial=done, unit="chunk", desc=config.name, disable=not progress
    ) as bar:
        for g in range(len(plan.groups)):
            statics = [_static_for(config, plan, g, v) for v in range(len(plan.variants))]
            # variants that share the unlearning (method, erased count) share a prepared chunk
            shared: dict = {}
            for v, static in enumerate(statics):
                shared.setdefault(static.for_prepare(), []).append(v)
            for part, variants in shared.items():
                chunks = [
                    c for c in range(n_chunks) if any((g, v, c) not in finished for v in variants)
                ]
                if not chunks:
                    continue
                first = {k: col[0] for k, col in plan.problem_knobs.items()}
                check_unlearning(part, first)  # eager checks, clear errors
                prepare = compiled.prepare(part)
                for c in chunks:
                    # pad: repeat the last problem
                    idx = np.minimum(np.arange(c * chunk, (c + 1) * chunk), n_problems - 1)
                    batch = {
                        k: jax.device_put(col[idx], compiled.sharding)
                        for k, col in plan.problem_knobs.items()
                    }
                    states = prepare(batch)
                    keep = min(chunk, n_problems - c * chunk)
                    for v in variants:
                        if (g, v, c) in finished:
                            continue
                        result = jax.device_get(compiled.observe(statics[v])(states, lrs))
                        flat = {  # (problem, lr) -> configuration rows, problem-major
                            k: np.asarray(r)[:keep].reshape((keep * n_lrs,) + r.shape[2:])
                            for k, r in result.items()
                        }
                        _save_chunk(out, g, v, c, flat)
                        bar.update(1)
    dataset = _assemble(config, out, plan, chunk)
    atomic_write(out / RESULTS_NAME, lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"))
    seeds = sorted({int(s) for s in plan.problem_knobs["seed"]})
    write_manifest(
        out,
        config=config,
        seeds=seeds,
        wall_time=time.perf_counter() - start,
        extra={
            "chunks_total": len(todo),
            "chunks_resumed": resumed,
            "chunk_size": chunk * n_lrs,
            "chunk_problems": chunk,
            "variants": len(plan.variants) * len(plan.groups),
            "compiled_functions": compiled.count,
            "fast_compile": fast_compile,
            "devices": [str(d) for d in devices],
            "jax_x64": bool(jax.config.jax_enable_x64),
        },
    )
    return xr.load_dataset(out / RESULTS_NAME, engine="h5netcdf")


def _chunk_path(out: Path, group: int, variant: int, chunk: int) -> Path:
    # The variant in the name: chunks of the older layout (g000_c00000.npz, a chunk of
    # configurations) never match, so a folder from before it is recomputed, not misread.
    return out / "chunks" / f"g{group:03d}_v{variant:03d}_c{chunk:05d}.npz"


def _save_chunk(out: Path, group: int, variant: int, chunk: int, arrays: dict) -> None:
    atomic_write(_chunk_path(out, group, variant, chunk), lambda tmp: np.savez(tmp, **arrays))


def _chunk_done(out: Path, group: int, variant: int, chunk: int) -> bool:
    """True for a finished chunk. Atomic writes make an existing chunk complete; one damaged
    outside this program (a copy cut short) fails to open or lacks arrays, and is recomputed."""
    path = _chunk_path(out, group, variant, chunk)
    if not path.is_file():
        return False
    try:  # opening reads the zip's central directory, stored at the end: a cut file fails here
        with np.load(path) as chunk_file:
            complete = set(chunk_file.files) == set(_EXTRA_DIMS)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        complete = False
    if not complete:
        warnings.warn(f"sweep chunk {path} is damaged; recomputing it.", stacklevel=3)
        path.unlink()
    return complete


def _pad_to(array: np.ndarray, shape) -> np.ndarray:
    """NaN-pad the trailing dims (groups with different d, m, K have different extra sizes)."""
    if array.shape == tuple(shape):
        return array
    padded = np.full(shape, np.nan)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    return padded


def _assemble(config, out, plan: SweepPlan, chunk: int):
    import xarray as xr

    static_axes, dynamic_axes = plan.static_axes, plan.dynamic_axes
    dyn_shape = [len(config.axis_values(n)) for n in dynamic_axes]
    n_variants, n_problems, _ = plan.config_index.shape
    per_group = []
    for g in range(len(plan.groups)):
        arrays = {}
        for v in range(n_variants):
            for c in range(-(-n_problems // chunk)):
                rows = plan.config_index[v, c * chunk : (c + 1) * chunk].reshape(-1)
                with np.load(_chunk_path(out, g, v, c)) as part:
                    for k in _EXTRA_DIMS:
                        if k not in arrays:
                            shape = (plan.n_configs,) + part[k].shape[1:]
                            arrays[k] = np.empty(shape, part[k].dtype)
                        arrays[k][rows] = part[k]
        per_group.append(arrays)
    data_vars = {}
    for name, extra in _EXTRA_DIMS.items():
        tail = tuple(max(p[name].shape[1 + i] for p in per_group) for i in range(len(extra)))
        stacked = np.stack([_pad_to(p[name], (p[name].shape[0],) + tail) for p in per_group])
        shape = [len(config.axis_values(n)) for n in static_axes] + dyn_shape + list(tail)
        data_vars[name] = (tuple(static_axes) + tuple(dynamic_axes) + extra, stacked.reshape(shape))
    coords = {n: config.axis_values(n) for n in config.axes}
    coords["steps"] = list(config.steps)
    coords["rank"] = list(config.truncation_ranks)
    coords["stage"] = ["unlearned", "finetuned"]
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(
        {"name": config.name, "config_hash": config.hash(), "config_toml": config.to_toml()}
    )
    for n in config.params:
        ds.attrs[f"param_{n}"] = config.params[n]
    return ds
