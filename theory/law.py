"""The resurgence law of theory.md section 4: one implementation for theory and bridge.

Full-batch GD with step ``lr`` for ``T`` steps on a quadratic with Hessian eigenpairs
(lambda_i, v_i), started at theta_u with gradient g, moves

    theta_T - theta_u = - sum_i a_i(T) <g, v_i> v_i,   a_i(T) = (1 - (1 - lr lambda_i)^T) / lambda_i,

so the resurgence along the unlearning displacement delta = theta_u - theta_0 is

    rho(T) = sum_i a_i(T) <g, v_i> <v_i, delta> / ||delta||^2.

Everything here is pure ``jax.numpy``: it accepts NumPy arrays, vmaps over configurations and
jit-compiles once per shape. ``bridge/`` calls these functions with measured eigenpairs; it never
re-implements them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from theory._precision import float64_if_given

__all__ = [
    "gd_amplification",
    "one_minus_power",
    "predict_rho",
    "predict_rho_truncated",
    "predict_readout_change",
    "predict_readout_change_truncated",
    "readout_closure_inputs",
    "truncated_closure_inputs",
]


@float64_if_given
def gd_amplification(eigenvalues, lr, steps):
    r"""Curvature amplification a(lambda, T) of full-batch GD, exact for every (lr lambda, T).

    .. math:: a(\lambda, T) = \frac{1 - (1 - \eta\lambda)^T}{\lambda}, \quad a(0, T) = \eta T.

    Evaluated without cancellation as eta lambda -> 0 at any T (a series in eta lambda alone is
    not: its error grows like (T eta lambda)^2), and near eta lambda = 2 (|base| -> 1); see
    :func:`one_minus_power` for the two exact evaluations.

    Args:
      eigenvalues: Hessian eigenvalues, any shape ``(...)``; may be negative.
      lr: step size eta (scalar).
      steps: step counts, shape ``(S,)`` (integers >= 0).

    Returns:
      Array of shape ``(S, ...)``: a(lambda, T) for each step count (units of lr * steps).

    >>> import numpy as np
    >>> round(float(gd_amplification(np.array(2.0), 0.1, np.array([3]))[0]), 9)  # (1 - 0.8**3) / 2
    0.244
    """
    lam = _floating(eigenvalues)
    lr = jnp.asarray(lr, lam.dtype)
    one_minus = one_minus_power(lr * lam, steps)
    t = _steps_like(steps, lam)
    zero = lam == 0
    return jnp.where(zero, lr * t, one_minus / jnp.where(zero, 1.0, lam))


# Largest unrolled chain (squarings + compositions over all step counts) that
# :func:`one_minus_power` builds; longer step lists take the expm1/log1p form (one op per T), so a
# long list does not inflate the compiled program.
_MAX_CHAIN_OPS = 256


@float64_if_given
def one_minus_power(x, steps):
    r"""1 - (1 - x)^T for each T in ``steps``, to a few ulps of its conditioning, shape ``(S, ...)``.

    Two exact evaluations, both from e = |1 - x| - 1 (exact: -x for x < 1, x - 2 for x >= 1 by
    Sterbenz), so no digit of a small x is lost to 1 - x:

    * step counts known when tracing (NumPy, lists, or constants; the usual case): binary powering
      in the expm1 domain, E(2a) = E(a) (2 + E(a)) and E(a + b) = E(a) + E(b) (1 + E(a)) with
      E(T) = |1 - x|^T - 1. No term cancels (for |1 - x| < 1 every E is in [-1, 0], above 1 every
      E is positive), and it takes only multiplications and additions: the law runs 1.6x faster
      than with the expm1 form, whose float64 log1p and expm1 dominated its cost
      (``python -m benchmarks.bench_theory``).
    * traced step counts: E(T) = expm1(T log1p(e)).

    For x > 1 the base is negative: (1 - x)^T = (-1)^T |1 - x|^T, so odd T gives 1 + |1 - x|^T
    = 2 + E(T) (two positive terms). Both forms are checked against 80-digit arithmetic
    (tests/theory/test_law.py).

    Args:
      x: eta lambda, any shape ``(...)`` (floating).
      steps: step counts ``(S,)``, integers >= 0.
    """
    x = _floating(x)
    e1 = jnp.where(x < 1.0, -x, x - 2.0)
    negative_base = x >= 1.0
    chain = _static_chain(steps)
    if chain is None:
        t = _steps_like(steps, x)
        odd = jnp.mod(jnp.asarray(steps).reshape(t.shape), 2) == 1
        e = jnp.expm1(t * jnp.log1p(e1))
        # x == 1: the base is exactly 0, so (1 - x)^T = 0 for T >= 1 (log1p(-1) = -inf gives that
        # too, but 0 * -inf at T = 0 would be NaN).
        e = jnp.where(t == 0, 0.0, e)
        return jnp.where(negative_base & odd, 2.0 + e, -e)
    powers = [e1]  # E(2^j)
    for _ in range(max(len(bits) for bits in chain) - 1):
        powers.append(powers[-1] * (2.0 + powers[-1]))
    rows = []
    for bits in chain:
        e = None  # E(0) = 0
        for j, bit in enumerate(bits):
            if bit:
                e = powers[j] if e is None else e + powers[j] * (1.0 + e)
        if e is None:
            rows.append(jnp.zeros_like(x))
        elif bits[0]:  # odd T: (1 - x)^T < 0 where the base is negative
            rows.append(jnp.where(negative_base, 2.0 + e, -e))
        else:
            rows.append(-e)
    return jnp.stack(rows)


def _floating(values):
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.result_type(float))
    return values


def _steps_like(steps, like):
    """Step counts as a float array of shape ``(S, 1, ..., 1)`` that broadcasts against ``like``."""
    steps = jnp.asarray(steps)
    return steps.reshape(steps.shape + (1,) * like.ndim).astype(like.dtype)


def _static_chain(steps):
    """The binary digits (least significant first) of each step count, when the step counts are
    concrete non-negative integers and their powering chain is short; else None."""
    try:
        values = np.asarray(steps)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        return None
    if np.any(values < 0) or np.any(values != np.round(values)):
        return None
    counts = [int(v) for v in values]
    width = max(max(counts).bit_length(), 1)
    if width - 1 + sum(bin(c).count("1") for c in counts) > _MAX_CHAIN_OPS:
        return None
    return [[(c >> j) & 1 for j in range(width)] for c in counts]


@float64_if_given
def predict_rho(eigenvalues, grad_coords, delta_coords, lr, steps):
    r"""Resurgence rho(T) of full-batch GD from a complete eigendecomposition (theory.md s.4).

    .. math:: \rho(T) = \sum_i a_i(T)\,\langle g, v_i\rangle\langle v_i, \delta\rangle
              / \|\delta\|^2

    The eigenbasis must be complete (all eigenpairs), so that ``||delta||^2`` equals
    ``sum(delta_coords**2)``; for a top-k basis use :func:`predict_rho_truncated`.

    Args:
      eigenvalues: lambda_i of the fine-tuning Hessian, shape ``(n,)``.
      grad_coords: <g, v_i> with g the fine-tuning gradient at theta_u, shape ``(n,)``.
      delta_coords: <delta, v_i> with delta = theta_u - theta_0, shape ``(n,)``.
      lr: GD step size eta (scalar).
      steps: step counts T, shape ``(S,)``.

    Returns:
      rho for each step count, shape ``(S,)`` (dimensionless; 0 = still unlearned, 1 = undone).

    >>> import numpy as np
    >>> # In-distribution (g = H delta): rho -> projection of delta on range(H) = 0.5 here.
    >>> lam = np.array([1.0, 0.0]); d = np.array([1.0, 1.0])
    >>> np.round(np.asarray(predict_rho(lam, lam * d, d, 0.5, np.array([1, 60]))), 6)
    array([0.25, 0.5 ])
    """
    delta_coords = jnp.asarray(delta_coords)
    return _law_sum(eigenvalues, grad_coords, delta_coords, lr, steps) / jnp.sum(delta_coords**2)


@float64_if_given
def predict_readout_change(eigenvalues, grad_coords, readout_coords, lr, steps):
    r"""First-order change Delta R(T) of any readout R under full-batch GD (theory.md s.4b).

    .. math:: \Delta R(T) = \langle \nabla R(\theta_u), \theta_T - \theta_u\rangle
              = -\sum_i a_i(T)\,\langle g, v_i\rangle\langle v_i, \nabla R(\theta_u)\rangle

    Exact when R is linear in theta (rho, output_rho in the linear model); first order otherwise.
    rho is the case grad R = -delta / ||delta||^2 (:func:`predict_rho`): the same kernel.

    Args:
      eigenvalues: lambda_i, shape ``(n,)`` (a complete eigenbasis; for top-k use
        :func:`predict_readout_change_truncated`).
      grad_coords: <g, v_i>, g the fine-tuning gradient at theta_u, shape ``(n,)``.
      readout_coords: <grad R(theta_u), v_i>, shape ``(n,)``.
      lr: GD step size eta; steps: step counts ``(S,)``.

    Returns:
      Delta R for each step count, shape ``(S,)``, in the readout's units.

    >>> import numpy as np
    >>> lam, g, r = np.array([2.0, 0.0]), np.array([1.0, 1.0]), np.array([3.0, 1.0])
    >>> # T = 1: -lr * <g, grad R> = -0.1 * 4
    >>> float(predict_readout_change(lam, g, r, 0.1, np.array([1]))[0])
    -0.4
    """
    return -_law_sum(eigenvalues, grad_coords, readout_coords, lr, steps)


@float64_if_given
def predict_readout_change_truncated(
    eigenvalues, grad_coords, readout_coords, lr, steps, *, grad_perp_dot_readout, lambda_perp
):
    r"""Delta R(T) from top-k eigenpairs plus the closure direction g_perp (theory.md s.4, 4b).

    .. math:: \Delta R_k(T) = -\sum_{i\le k} a_i(T) g_i r_i
              - a(\lambda_\perp, T)\,\langle g_\perp, \nabla R\rangle

    Args:
      eigenvalues, grad_coords, readout_coords: top-k quantities, shape ``(k,)``.
      lr: GD step size; steps: ``(S,)``.
      grad_perp_dot_readout: <g_perp, grad R> (scalar); lambda_perp: Rayleigh quotient of H
        along g_perp (scalar). See :func:`readout_closure_inputs`.

    Returns:
      Delta R_k for each step count, shape ``(S,)``.
    """
    head = _law_sum(eigenvalues, grad_coords, readout_coords, lr, steps)
    tail = gd_amplification(jnp.asarray(lambda_perp), lr, steps) * grad_perp_dot_readout
    return -(head + tail)


@float64_if_given
def readout_closure_inputs(eigenvectors, grad, readout):
    """<v_i, grad R> on the top-k eigenvectors and <g_perp, grad R> for the closure.

    Args:
      eigenvectors: orthonormal columns ``(n, k)``; grad: g ``(n,)``; readout: grad R ``(n,)``.

    Returns:
      dict with ``readout_coords`` ``(k,)`` and ``grad_perp_dot_readout`` (scalar); with the
      ``eigenvalues``, ``grad_coords`` and ``lambda_perp`` of :func:`truncated_closure_inputs`
      they are the arguments of :func:`predict_readout_change_truncated`.
    """
    g_perp = grad - eigenvectors @ (eigenvectors.T @ grad)
    return {"readout_coords": eigenvectors.T @ readout, "grad_perp_dot_readout": g_perp @ readout}


@float64_if_given
def predict_rho_truncated(
    eigenvalues,
    grad_coords,
    delta_coords,
    lr,
    steps,
    *,
    delta_norm_sq,
    grad_perp_dot_delta,
    lambda_perp,
):
    r"""Truncated closure rho_k(T) from the top-k eigenpairs (theory.md section 4).

    The remainder g_perp = g - sum_{i<=k} <g, v_i> v_i is treated as one direction with curvature
    lambda_perp = g_perp^T H g_perp / ||g_perp||^2 (one extra Hessian-vector product):

    .. math:: \rho_k(T) = \sum_{i\le k} a_i(T) g_i \delta_i / \|\delta\|^2
              + a(\lambda_\perp, T)\,\langle g_\perp, \delta\rangle / \|\delta\|^2

    Args:
      eigenvalues, grad_coords, delta_coords: top-k quantities, shape ``(k,)``.
      lr: GD step size; steps: shape ``(S,)``.
      delta_norm_sq: ||delta||^2 over the whole parameter group (scalar).
      grad_perp_dot_delta: <g_perp, delta> (scalar).
      lambda_perp: Rayleigh quotient of H along g_perp (scalar; 0 if g_perp = 0).

    Returns:
      rho_k for each step count, shape ``(S,)``.
    """
    # rho_k = Delta R_k for grad R = -delta / ||delta||^2: the readout law's kernel.
    return predict_readout_change_truncated(
        eigenvalues,
        grad_coords,
        -jnp.asarray(delta_coords) / delta_norm_sq,
        lr,
        steps,
        grad_perp_dot_readout=-grad_perp_dot_delta / delta_norm_sq,
        lambda_perp=lambda_perp,
    )


@float64_if_given
def truncated_closure_inputs(eigenvalues, eigenvectors, hessian_matvec, grad, delta):
    """Project g and delta on the top-k eigenvectors and form the closure's remainder terms.

    Args:
      eigenvalues: shape ``(k,)``; eigenvectors: orthonormal columns, shape ``(n, k)``.
      hessian_matvec: function v -> H v on flat vectors of shape ``(n,)``.
      grad: g, shape ``(n,)``; delta: shape ``(n,)``.

    Returns:
      dict with ``grad_coords``, ``delta_coords`` (each ``(k,)``), ``delta_norm_sq``,
      ``grad_perp_dot_delta`` and ``lambda_perp``, the keyword arguments of
      :func:`predict_rho_truncated` besides lr and steps.
    """
    grad_coords = eigenvectors.T @ grad
    delta_coords = eigenvectors.T @ delta
    g_perp = grad - eigenvectors @ grad_coords
    g_perp_sq = jnp.sum(g_perp**2)
    safe = jnp.where(g_perp_sq > 0, g_perp_sq, 1.0)
    lambda_perp = jnp.where(g_perp_sq > 0, g_perp @ hessian_matvec(g_perp) / safe, 0.0)
    return {
        "eigenvalues": jnp.asarray(eigenvalues),
        "grad_coords": grad_coords,
        "delta_coords": delta_coords,
        "delta_norm_sq": jnp.sum(delta**2),
        "grad_perp_dot_delta": g_perp @ delta,
        "lambda_perp": lambda_perp,
    }


def _law_sum(eigenvalues, grad_coords, coords, lr, steps):
    """The one kernel of the law: sum_i a_i(T) <g, v_i> <v_i, u> for each T, shape ``(S,)``.

    1/lambda_i is folded into the per-eigenpair weight, so it is divided once, not once per T.
    """
    lam = _floating(eigenvalues)
    lr = jnp.asarray(lr, lam.dtype)
    weights = jnp.asarray(grad_coords) * jnp.asarray(coords)
    zero = lam == 0
    per_curvature = jnp.where(zero, 0.0, weights / jnp.where(zero, 1.0, lam))
    flat = jnp.sum(jnp.where(zero, weights, 0.0), axis=-1)  # a(0, T) = lr T
    steps_f = _steps_like(steps, flat)
    return jnp.sum(one_minus_power(lr * lam, steps) * per_curvature, axis=-1) + lr * steps_f * flat
