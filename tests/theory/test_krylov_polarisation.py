"""The one polarisation implementation (theory.krylov) against a dense eigendecomposition."""

import re

import numpy as np
import pytest

from theory.krylov import polarisation_runs, polarised_quadrature
from theory.law import gd_amplification


def _dense_case(n=12, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.linspace(-0.5, 2.0, n)  # indefinite, as at a trained UNet
    return (q * lam) @ q.T, lam, q, rng.standard_normal(n), rng.standard_normal(n)


def test_polarised_quadrature_is_exact_for_t_up_to_twice_the_depth():
    h, lam, q, g, u = _dense_case()
    steps = np.array([1, 3, 8])
    runs = polarisation_runs(lambda v: h @ v, g, u, 4)
    assert runs.matvecs == 8
    amp = np.asarray(gd_amplification(lam, 0.3, steps))  # (S, n)
    want = amp @ ((q.T @ u) * (q.T @ g))  # <u, a(H, T) g> from the eigendecomposition
    np.testing.assert_allclose(polarised_quadrature(runs, 0.3, steps), want, rtol=1e-10)
    with pytest.raises(ValueError, match=re.escape("the largest requested T is 9")):
        polarised_quadrature(runs, 0.3, np.array([9]))
    # u = 2 g is parallel to g: one run suffices, and <u, a(H, T) g> = 2 <g, a(H, T) g>.
    par = polarisation_runs(lambda v: h @ v, g, 2.0 * g, 4)
    assert par.minus is None and par.matvecs == 4
    want_par = amp @ (2.0 * (q.T @ g) ** 2)
    np.testing.assert_allclose(polarised_quadrature(par, 0.3, steps), want_par, rtol=1e-10)


def test_polarisation_refuses_zero_vectors():
    h, _, _, g, u = _dense_case()
    with pytest.raises(ValueError, match=re.escape("`readout` gradient is zero")):
        polarisation_runs(lambda v: h @ v, g, np.zeros_like(u), 3)
    with pytest.raises(ValueError, match=re.escape("`grad` is zero: GD does not move")):
        polarisation_runs(lambda v: h @ v, np.zeros_like(g), u, 3)
