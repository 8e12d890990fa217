"""float64 when the caller passes float64, whatever the global ``jax_enable_x64`` flag.

JAX silently computes in float32 unless x64 is enabled process-wide; a library user who hands the
law NumPy float64 measurements would get float32 answers without being told (error 5e-7 instead
of 1e-14). Public entry points that take NumPy arrays are wrapped so that float64 inputs run under
the thread-local ``jax.enable_x64(True)`` scope; entry points that build arrays from keys warn once.
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

__all__ = ["float64_if_given", "warn_once_if_float32"]

_WARNED = False


def _is_float64(value) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None and isinstance(value, (list, tuple)) and value:
        return any(_is_float64(v) for v in value)
    return dtype is not None and np.dtype(dtype) in (np.float64, np.complex128)


def float64_if_given(fn):
    """Run ``fn`` with x64 enabled (scoped) when any argument is a float64/complex128 array."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if jax.config.jax_enable_x64 or not any(
            _is_float64(v) for v in (*args, *kwargs.values())
        ):
            return fn(*args, **kwargs)
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper


def warn_once_if_float32(where: str) -> None:
    """Warn (once per process) that ``where`` computes in float32 because x64 is off."""
    global _WARNED
    if jax.config.jax_enable_x64 or _WARNED:
        return
    _WARNED = True
    warnings.warn(
        f"theory.{where}: JAX's `jax_enable_x64` is off, so the linear model is built and solved "
        "in float32 (relative error ~1e-7 instead of ~1e-15). For exact results call "
        "`jax.config.update('jax_enable_x64', True)` before using `theory`, or wrap the calls in "
        "`with jax.enable_x64(True):`.",
        stacklevel=3,
    )
