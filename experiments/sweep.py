"""Run a sweep config: vmapped, sharded over devices, chunked, resumable, with a manifest.

The grid splits into *groups* (one per combination of static parameters: sizes, method,
optimizer) and, inside a group, a flat list of configurations of the traced knobs. Each group is
one ``jax.jit(jax.vmap(run_scenario))`` compiled once; the configurations go through it in
chunks of a fixed size (the last one padded), sharded over a 1-D device mesh on the
configuration axis. Every finished chunk is saved to ``OUT/chunks/`` before the next starts, so a
rerun after an interruption skips it and the assembled results are identical. Every file is
written atomically (:mod:`theory._atomic`), so a chunk that exists is complete even after kill -9.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from experiments.config import PARAMS, ConfigError, SweepConfig
from experiments.manifest import write_manifest
from theory._atomic import atomic_write, remove_partial_writes
from theory._backend import init_backend_without_lapack_deadlock

__all__ = ["run_sweep", "RESULTS_NAME", "group_grid", "enable_compilation_cache"]

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


# Indexed parameters: the tuple of ScenarioStatic listing the variants, and the index knob.
_INDEXED = {
    "method": ("methods", "method_index"),
    "optimizer": ("optimizers", "optimizer_index"),
    "num_erased": ("erased_counts", "num_erased_index"),
}


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


def group_grid(config: SweepConfig):
    """(static axis names, their value tuples per group, vmapped axis names, knob arrays).

    The knob arrays hold one entry per configuration (C order over the vmapped axes); an indexed
    axis (method, optimizer, num_erased) contributes the index of its value.
    """
    from theory.sweep import DYNAMIC_KNOBS, INT_KNOBS

    static_axes = [n for n in config.axes if PARAMS[n].static]
    dynamic_axes = [n for n in config.axes if not PARAMS[n].static]
    groups = list(itertools.product(*(config.axis_values(n) for n in static_axes)))
    lengths = [len(config.axis_values(n)) for n in dynamic_axes]
    mesh = np.meshgrid(*(np.arange(k) for k in lengths), indexing="ij")
    size = int(np.prod(lengths))
    columns = {}
    for axis, positions in zip(dynamic_axes, mesh, strict=True):
        flat = positions.reshape(-1)
        if axis in _INDEXED:
            columns[_INDEXED[axis][1]] = flat
        else:
            columns[axis] = np.asarray(config.axis_values(axis))[flat]
    knobs = {}
    for name in DYNAMIC_KNOBS:
        dtype = np.int64 if name in INT_KNOBS else np.float64
        default = 0 if name.endswith("_index") else config.value(name)
        knobs[name] = (
            columns[name].astype(dtype) if name in columns else np.full(size, default, dtype=dtype)
        )
    return static_axes, groups, dynamic_axes, knobs


def _static_for(config: SweepConfig, static_axes, values):
    from theory.sweep import ScenarioStatic

    fields = {
        f: config.value(f) for f in ("dim", "embed_dim", "num_concepts", "num_levels", "finetune")
    }
    fields.update(dict(zip(static_axes, values, strict=True)))
    for param, (field, _) in _INDEXED.items():
        fields[field] = (
            tuple(config.axis_values(param)) if param in config.axes else (config.value(param),)
        )
    return ScenarioStatic(
        steps=tuple(config.steps), truncation_ranks=tuple(config.truncation_ranks), **fields
    )


def _compiled(static, devices):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from theory.sweep import run_scenario

    sharding = NamedSharding(Mesh(np.asarray(devices), ("config",)), PartitionSpec("config"))
    fn = jax.jit(
        jax.vmap(lambda knobs: run_scenario(static, knobs)),
        in_shardings=sharding,
        out_shardings=sharding,
    )
    return fn, sharding


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
    static_axes, groups, dynamic_axes, knobs = group_grid(config)
    n_configs = len(next(iter(knobs.values())))
    n_dev = len(devices)
    # chunk_size configurations per device: every device then runs the same program on the same
    # shapes whatever the device count, so results are bitwise identical on 1 or N devices.
    chunk = min(config.chunk_size, -(-n_configs // n_dev)) * n_dev
    n_chunks = -(-n_configs // chunk)
    todo = [(g, c) for g in range(len(groups)) for c in range(n_chunks)]
    finished = {(g, c) for g, c in todo if _chunk_done(out, g, c)}
    done = resumed = len(finished)
    with tqdm(
        total=len(todo), initial=done, unit="chunk", desc=config.name, disable=not progress
    ) as bar:
        for g, values in enumerate(groups):
            missing = [c for c in range(n_chunks) if (g, c) not in finished]
            if not missing:
                continue
            static = _static_for(config, static_axes, values)
            check_unlearning(
                static, {k: v[0] for k, v in knobs.items()}
            )  # eager checks, clear errors
            fn, sharding = _compiled(static, devices)
            for c in missing:
                idx = np.minimum(
                    np.arange(c * chunk, (c + 1) * chunk), n_configs - 1
                )  # pad: repeat the last
                batch = {k: jax.device_put(v[idx], sharding) for k, v in knobs.items()}
                result = jax.device_get(fn(batch))
                keep = min(chunk, n_configs - c * chunk)
                _save_chunk(out, g, c, {k: np.asarray(v)[:keep] for k, v in result.items()})
                bar.update(1)
    dataset = _assemble(config, out, static_axes, groups, dynamic_axes, n_chunks)
    atomic_write(out / RESULTS_NAME, lambda tmp: dataset.to_netcdf(tmp, engine="h5netcdf"))
    seeds = sorted({int(s) for s in knobs["seed"]})
    write_manifest(
        out,
        config=config,
        seeds=seeds,
        wall_time=time.perf_counter() - start,
        extra={
            "chunks_total": len(todo),
            "chunks_resumed": resumed,
            "chunk_size": chunk,
            "devices": [str(d) for d in devices],
            "jax_x64": bool(jax.config.jax_enable_x64),
        },
    )
    return xr.load_dataset(out / RESULTS_NAME, engine="h5netcdf")


def _chunk_path(out: Path, group: int, chunk: int) -> Path:
    return out / "chunks" / f"g{group:03d}_c{chunk:05d}.npz"


def _save_chunk(out: Path, group: int, chunk: int, arrays: dict) -> None:
    atomic_write(_chunk_path(out, group, chunk), lambda tmp: np.savez(tmp, **arrays))


def _chunk_done(out: Path, group: int, chunk: int) -> bool:
    """True for a finished chunk. Atomic writes make an existing chunk complete; one damaged
    outside this program (a copy cut short) fails to open or lacks arrays, and is recomputed."""
    path = _chunk_path(out, group, chunk)
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


def _assemble(config, out, static_axes, groups, dynamic_axes, n_chunks):
    import xarray as xr

    dyn_shape = [len(config.axis_values(n)) for n in dynamic_axes]
    per_group = []
    for g in range(len(groups)):
        parts = [np.load(_chunk_path(out, g, c)) for c in range(n_chunks)]
        per_group.append({k: np.concatenate([p[k] for p in parts]) for k in _EXTRA_DIMS})
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
