"""Principal angles: one implementation (theory.observables) for the sweep, the API and bridge."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from theory.observables import principal_angles
from theory.sweep import _angles

_EPS = np.finfo(np.float64).eps
ANGLES = [1e-3, 1e-5, 1e-8, 1e-9, 1e-10, 1e-12, 0.3, 1.2]


def _constructed(angle, m=8, seed=0):
    """A forget direction r and three fine-tuning prompts whose span meets r at exactly ``angle``."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(m, m)))
    r = 2.0 * q[:, 0]
    closest = np.cos(angle) * q[:, 0] + np.sin(angle) * q[:, 1]
    prompts = 1.7 * np.stack([closest, q[:, 2] + 0.5 * q[:, 3], q[:, 4]], axis=1)
    return r, prompts


@pytest.mark.parametrize("angle", ANGLES)
def test_sweep_and_api_angles_are_exact_at_small_angles(angle):
    r, prompts = _constructed(angle)
    # The inputs carry O(eps) rounding, so the best attainable error is a few eps absolute;
    # arccos alone gives sqrt(eps) ~ 1.5e-8 (the defect this replaces).
    tolerance = 8 * _EPS
    api = float(principal_angles(jnp.asarray(r[:, None]), jnp.asarray(prompts))[0])
    # The sweep's form: masked forget columns (weight 0) and a zero-probability prompt column.
    forget = jnp.asarray(np.stack([r, np.zeros_like(r)], axis=1))
    ft = jnp.asarray(np.concatenate([prompts, np.zeros((r.size, 1))], axis=1))
    sweep = np.asarray(
        _angles(forget, jnp.asarray([1.0, 0.0]), ft, jnp.asarray([0.3, 0.3, 0.4, 0.0]))
    )
    assert abs(api - angle) <= tolerance, (api, angle)
    assert abs(sweep[0] - angle) <= tolerance, (sweep[0], angle)
    assert np.isnan(sweep[1])  # past the forget rank


def test_angles_agree_with_scipy_on_random_subspaces():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    ours = np.asarray(principal_angles(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(ours, np.sort(scipy.linalg.subspace_angles(a, b)), atol=1e-14)
