"""A reporting closeness check shared by the theory and bridge tests (nt / curvlinops style).

On failure it reports the relative Frobenius error, the mean absolute error and the worst
entries with their ratios, so a failing comparison says where and by how much.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assert_allclose_report"]


def assert_allclose_report(actual, expected, *, rtol: float, atol: float = 0.0, name: str = "value", worst: int = 5):
    """Assert |actual - expected| <= atol + rtol |expected| elementwise, with a diagnostic report.

    Raises:
      AssertionError: with the relative Frobenius error, mean absolute error and worst indices.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    err = np.abs(a - e)
    bad = err > atol + rtol * np.abs(e)
    if not np.any(bad):
        return
    rel_fro = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300)
    order = np.argsort(err, axis=None)[::-1][:worst]
    lines = [
        f"{name}: {int(bad.sum())} of {a.size} entries off (rtol={rtol}, atol={atol});",
        f"  relative Frobenius error {rel_fro:.3e}, mean |error| {err.mean():.3e}",
    ]
    for flat in order:
        idx = np.unravel_index(flat, a.shape)
        ratio = a[idx] / e[idx] if e[idx] != 0 else np.inf
        lines.append(f"  at {tuple(int(i) for i in idx)}: actual {a[idx]:.6e} expected {e[idx]:.6e} ratio {ratio:.6g}")
    raise AssertionError("\n".join(lines))
