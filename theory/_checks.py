"""Argument checks shared by the public constructors (run eagerly, never inside jit)."""

from __future__ import annotations

import math

import numpy as np

# Relative tolerance for "sums to one": probabilities typed by hand (0.1 + 0.2 + 0.7).
_PROB_SUM_RTOL = 1e-6


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Return ``value`` as int or raise ``ValueError`` naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def finite_float(name: str, value, *, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Return ``value`` as float if finite and inside the interval, else raise ``ValueError``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number; got {value!r}.") from None
    bad_low = x <= low if low_open else x < low
    bad_high = x >= high if high_open else x > high
    if not math.isfinite(x) or bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be finite and in {lo}{low}, {high}{hi}; got {value!r}.")
    return x


def step_counts(name: str, steps) -> np.ndarray:
    """``steps`` as a non-empty 1-D integer array of step counts >= 0, else ``ValueError``."""
    arr = np.asarray(steps)
    if (
        arr.ndim != 1
        or arr.size == 0
        or not np.issubdtype(arr.dtype, np.integer)
        or np.any(arr < 0)
    ):
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of integers >= 0; got {steps!r}.")
    return arr


def probability_vector(name: str, probs) -> np.ndarray:
    """Check a probability vector: finite, non-negative, summing to one."""
    p = np.asarray(probs, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D probability vector; got shape {p.shape}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"`{name}` must have finite entries >= 0; got {p.tolist()}.")
    if abs(p.sum() - 1.0) > _PROB_SUM_RTOL:
        raise ValueError(f"`{name}` must sum to 1 (allowed range: entries in [0, 1]); sums to {float(p.sum()):.6g}.")
    return p


def spd_matrix(name: str, matrix) -> np.ndarray:
    """Check that ``matrix`` is square, finite, symmetric and positive definite."""
    s = np.asarray(matrix, dtype=float)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"`{name}` must be a square matrix; got shape {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"`{name}` must be finite.")
    scale = max(np.abs(s).max(), 1e-300)
    if np.abs(s - s.T).max() > 1e-8 * scale:
        raise ValueError(f"`{name}` must be symmetric (max |S - S^T| = {np.abs(s - s.T).max():.3g}).")
    smallest = np.linalg.eigvalsh(s).min()
    if smallest <= 0:
        raise ValueError(
            f"`{name}` must be positive definite (SPD); its smallest eigenvalue is {float(smallest):.3g}."
        )
    return s


def finite_array(name: str, array) -> np.ndarray:
    """Check that every entry of ``array`` is finite."""
    a = np.asarray(array)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` must contain only finite values.")
    return a


def registry_lookup(kind: str, name: str, registry: dict):
    """``registry[name]``, or ``ValueError`` listing the valid names from that same registry."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(registry)}.")
    return registry[name]
