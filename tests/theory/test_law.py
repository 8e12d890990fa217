"""The resurgence law's building blocks against exact arithmetic (mpmath) and direct GD."""

import math

import jax
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.law import gd_amplification, predict_rho

_EPS = np.finfo(np.float64).eps


def _exact_amplification(lam: float, lr: float, steps: int) -> float:
    """(1 - (1 - lr lam)^T) / lam in 80-digit arithmetic on the exact binary inputs."""
    with mpmath.workdps(80):
        lam_m, lr_m = mpmath.mpf(lam), mpmath.mpf(lr)
        if lam_m == 0:
            return float(lr_m * steps)
        x = lr_m * lam_m
        if x < 1:  # expm1/log1p keep the digits that (1 - x)^T would cancel, even at 80 digits
            return float(-mpmath.expm1(steps * mpmath.log1p(-x)) / lam_m)
        return float((1 - (1 - x) ** steps) / lam_m)


def _error_bound(lam: float, lr: float, steps: int) -> float:
    """First-order absolute error bound (in ulps) of a float64 evaluation, a = (1 - P) / lam with
    P = (1 - x)^T: x = lr * lam carries one rounding, which moves P by T |x| |1 - x|^(T-1) eps;
    exp amplifies the error of its argument T log|1 - x| by |P| T |log|1 - x||; the rest is a
    handful of roundings of |1 - P| and |P|."""
    x = lr * lam
    if lam == 0:
        return abs(lr * steps)
    base = abs(1 - x)
    power = base**steps
    log_base = abs(math.log(base)) if base > 0 else 0.0
    through_x = steps * abs(x) * base ** (steps - 1) if steps > 0 else 0.0
    return (abs(1 - (1 - x) ** steps) + power * (1 + steps * log_base) + through_x) / abs(lam)


# Products lr * lambda spanning tiny (1e-12), moderate, near 1 and near 2, and negative curvature.
_products = st.one_of(
    st.floats(-1e-6, 1e-6),
    st.floats(-0.5, 1.99),
    st.floats(0.999, 1.001),
    st.floats(1.99, 2.0),
)


# Step counts traced under jit take the expm1/log1p form; concrete ones the binary powering chain.
_traced_amplification = jax.jit(gd_amplification)


@pytest.mark.parametrize("form", ["binary chain (concrete steps)", "expm1 (traced steps)"])
@settings(max_examples=300, deadline=None)
@given(x=_products, lr=st.floats(1e-3, 10.0), steps=st.integers(0, 30_000_000))
def test_amplification_is_exact_everywhere(form, x, lr, steps):
    lam = x / lr
    # Keep the growing (negative-curvature) case finite in float64.
    if x < 0 and steps * math.log1p(-x) > 600:
        steps = int(600 / math.log1p(-x))
    exact = _exact_amplification(lam, lr, steps)
    amplification = gd_amplification if form.startswith("binary") else _traced_amplification
    ours = float(amplification(np.array(lam), lr, np.array([steps]))[0])
    # 8 ulps of the first-order error bound: a handful of float64 roundings.
    tolerance = 8 * _EPS * _error_bound(lam, lr, steps) + 1e-300
    assert abs(ours - exact) <= tolerance, (lam, lr, steps, ours, exact)


def test_amplification_cases_the_old_series_got_wrong():
    """The issue's cases: lr lambda = +-9e-8 at T = 1e6 .. 3e7 (the series was off by up to 54%)."""
    for lam, steps in ((9e-8, 10**6), (9e-8, 10**7), (-9e-8, 3 * 10**7)):
        exact = _exact_amplification(lam, 1.0, steps)
        ours = float(gd_amplification(np.array(lam), 1.0, np.array([steps]))[0])
        assert abs(ours - exact) <= 1e-14 * exact, (lam, steps, ours, exact)
    # Both sides of the old series threshold |lr lambda| = 1e-7 (where the value used to jump).
    for lam in (0.99e-7, 1.01e-7):
        exact = _exact_amplification(lam, 1.0, 10**7)
        ours = float(gd_amplification(np.array(lam), 1.0, np.array([10**7]))[0])
        assert abs(ours - exact) <= 1e-14 * exact, (lam, ours, exact)


def test_amplification_matches_a_gd_run_through_the_singular_points():
    """lr lambda = 1 (one step to the minimum) and = 2 (period-2 oscillation): summed GD steps."""
    for x in (1.0, 2.0, 1.5, -0.25):
        lam, lr = x / 0.5, 0.5
        # GD on the 1-D quadratic lam/2 u^2 - u from u_0 = 0: u_{T+1} = u_T - lr (lam u_T - 1),
        # whose iterates are exactly a(lam, T).
        direct, a = 0.0, []
        for _ in range(9):
            a.append(direct)
            direct = direct - lr * (lam * direct - 1.0)
        ours = np.asarray(gd_amplification(np.array(lam), lr, np.arange(9)))
        np.testing.assert_allclose(ours, a, rtol=1e-15, atol=1e-15)


def test_law_is_float64_for_float64_inputs_even_with_x64_off():
    """NumPy float64 in, float64 out, whatever the global x64 flag (scoped, thread-local)."""
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.1, 1.0, 6)
    g, d = rng.normal(size=6), rng.normal(size=6)
    steps = np.array([1, 7, 40])
    exact = [np.sum((1 - (1 - 0.5 * lam) ** t) / lam * g * d) / np.sum(d**2) for t in steps]
    with jax.enable_x64(False):
        rho = predict_rho(lam, g, d, 0.5, steps)
        amp = gd_amplification(lam, 0.5, steps)
    assert rho.dtype == np.float64 and amp.dtype == np.float64
    np.testing.assert_allclose(np.asarray(rho), exact, rtol=1e-13)


def test_building_a_problem_with_x64_off_warns_once_with_the_fix(monkeypatch):
    import warnings

    import pytest

    from theory import _precision, make_problem

    monkeypatch.setattr(_precision, "_WARNED", False)
    with jax.enable_x64(False):
        with pytest.warns(UserWarning, match=r"jax\.config\.update\('jax_enable_x64', True\)"):
            make_problem(jax.random.PRNGKey(0), dim=4, embed_dim=3, num_concepts=2, num_levels=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            make_problem(jax.random.PRNGKey(0), dim=4, embed_dim=3, num_concepts=2, num_levels=2)


def test_both_forms_agree_on_a_step_list_and_long_lists_take_the_expm1_form():
    """The binary chain shares its squarings between step counts; a list whose chain would be
    longer than _MAX_CHAIN_OPS is evaluated by expm1 instead (same values to a few ulps)."""
    from theory import law

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-0.2, 1.99, 200), [0.0, 1.0, 2.0, 1e-12, -1e-12]])
    steps = np.array([0, 1, 2, 3, 7, 10, 100, 1000, 12345])
    chain = np.asarray(law.one_minus_power(x, steps))
    traced = np.asarray(jax.jit(law.one_minus_power)(x, steps))
    np.testing.assert_allclose(chain, traced, rtol=1e-13, atol=0)
    assert law._static_chain(steps) is not None
    long_list = np.arange(0, 4000, 7)
    assert law._static_chain(long_list) is None
    np.testing.assert_allclose(
        np.asarray(law.one_minus_power(x, long_list)),
        np.asarray(jax.jit(law.one_minus_power)(x, long_list)),
        rtol=0,
        atol=0,
    )
