r"""The Adam prediction: Adam's own recursion run on the local quadratic model (theory.md s.4).

Adam is not a linear filter of the gradient, so it has no closed form like GD's law. But the
fine-tuning loss is (locally) quadratic, so its gradient anywhere near theta_u is known from
measurements made at theta_u:

.. math:: \nabla L(\theta_u + x) = g + H x, \qquad g = \nabla L(\theta_u),

and Adam's trajectory x_T = theta_T - theta_u follows by running Adam's recursion (moments,
bias correction, eps, decoupled weight decay: whatever ``optimizer`` is) on that gradient. The
preconditioner P = sqrt(v_hat) + eps is thereby re-estimated along the predicted path, which is
what the fixed-P prediction of :mod:`theory.preconditioned` lacks (it is exact at T = 1 only).

Exactness: on a quadratic loss (the linear model) the local model IS the loss, so the prediction
equals an optax simulation to round-off at every T (``tests/theory/test_adam_law.py``, float64,
T = 1..500: relative displacement error <= 6e-10, except 2.3e-8 at a transient where Adam itself
turns a 1e-15 perturbation of theta_u into 1.7e-7: a gradient entry crossing zero). On a network
it is exact for Adam on the second-order Taylor model at theta_u, the approximation the GD law
makes too.

What it needs from theta_u (the bridge must supply it):

- exact (:func:`adam_on_quadratic` with the true HVP): g (one gradient) and ONE Hessian-vector
  product per Adam step, H x_k at the current predicted displacement; T HVPs for T steps, per
  optimizer setting (lr, betas, eps, weight decay): unlike GD's law, no reuse across lr. On a
  UNet an HVP costs ~3 gradients, so this costs more than the fine-tuning run it predicts; its
  use is to separate what the local quadratic model explains from what it does not.
- low rank (:func:`low_rank_hessian_matvec`): the top-k eigenpairs and the closure curvature
  lambda_perp (as for rho_k; k + 1 HVPs plus the eigensolver's); then zero HVPs per step, every
  lr and T from one measurement. Not exact: H is replaced by V_k Lambda_k V_k^T +
  lambda_perp (I - V_k V_k^T). Adam's per-coordinate normalisation spreads the update over all
  eigendirections (its update is not in span(g, Hg, ...)), so unlike GD the error does not vanish
  when g lies in the top-k space: the remainder's curvature matters, and the closure's single
  lambda_perp (a Rayleigh quotient along g_perp, round-off once g_perp is) does not describe it.
  Measured (``tests/theory/test_adam_law.py``; linear model, n = 234 parameters of which 72 null
  directions, Adam lr 1e-3, T = 500), relative displacement error for k = 1, n/4, n/2, 162 (every
  nonzero eigenpair), n - 1: ESD-x 0.82, 0.78, 0.76, 0.73, 0.003; UCE 0.84, 0.72, 0.70, 0.67,
  0.07; round-off at k = n. Use the exact form; the low-rank one is the baseline a cheap Adam
  prediction has to beat.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory import _checks
from theory._precision import float64_if_given

__all__ = ["AdamPath", "adam_on_quadratic", "low_rank_hessian_matvec", "readouts_along"]


class AdamPath(NamedTuple):
    """A predicted optimizer trajectory on the local quadratic model.

    Attributes:
      steps: the requested step counts, ``(S,)``.
      displacement: theta_T - theta_u for each step count, ``(S, *theta.shape)``.
      hessian_matvecs: Hessian-vector products the prediction used (= max T: one per step).
    """

    steps: jax.Array
    displacement: jax.Array
    hessian_matvecs: int


@functools.partial(jax.jit, static_argnames=("hessian_matvec", "optimizer", "num_steps"))
def _run(hessian_matvec, optimizer, num_steps, grad, theta_u, steps):
    out = jnp.zeros((steps.shape[0],) + theta_u.shape, theta_u.dtype)
    # Step 0 is the start point (x = 0, already in ``out``); each record slot gets x at its T.

    def one_step(carry, t):
        x, state, out = carry
        gradient = grad + hessian_matvec(x)  # exact gradient of the quadratic model at theta_u + x
        updates, state = optimizer.update(gradient, state, theta_u + x)
        x = x + updates  # optax.apply_updates on the displacement: theta - theta_u moves the same
        hit = steps == t
        out = jnp.where(hit.reshape((-1,) + (1,) * x.ndim), x[None], out)
        return (x, state, out), None

    carry = (jnp.zeros_like(theta_u), optimizer.init(theta_u), out)
    (_, _, out), _ = jax.lax.scan(one_step, carry, jnp.arange(1, num_steps + 1))
    return out


@float64_if_given
def adam_on_quadratic(
    hessian_matvec: Callable,
    grad,
    theta_u,
    optimizer: optax.GradientTransformation,
    steps,
) -> AdamPath:
    r"""Predict x_T = theta_T - theta_u of ``optimizer`` (Adam, AdamW, ...) from theta_u.

    Runs ``optimizer`` on the gradient g + H x of the quadratic model, inside one jitted
    ``lax.scan``; exact for a quadratic loss (module docstring).

    Args:
      hessian_matvec: x -> H x on arrays shaped like ``theta_u`` (jax-traceable; hashable, as it
        is a static argument of the jitted scan: pass the same function to reuse the compilation).
      grad: g = grad L_ft(theta_u), shaped like ``theta_u``.
      theta_u: the start point (AdamW's weight decay acts on theta itself, not on x).
      optimizer: the optax transformation the fine-tuning uses (e.g. ``optax.adam(lr)``).
      steps: ``(S,)`` step counts (integers >= 0).

    Returns:
      :class:`AdamPath`, displacement ``(S, *theta_u.shape)``; it used max(steps) HVPs.

    Raises:
      ValueError: ``steps`` empty, not 1-D integers >= 0, or ``grad`` not shaped like ``theta_u``.

    >>> import numpy as np, optax
    >>> h = np.diag([2.0, 0.5]); g = np.array([1.0, -1.0])
    >>> path = adam_on_quadratic(lambda x: h @ x, g, np.zeros(2), optax.adam(0.1), np.array([1]))
    >>> np.round(np.asarray(path.displacement[0]), 6)  # Adam's first step: -lr g / (|g| + eps)
    array([-0.1,  0.1])
    """
    theta_u = jnp.asarray(theta_u)
    grad = jnp.asarray(grad, theta_u.dtype)
    if grad.shape != theta_u.shape:
        raise ValueError(
            f"`grad` must have the shape of `theta_u` {theta_u.shape}; got {grad.shape}."
        )
    steps_np = _checks.step_counts("steps", steps)
    num_steps = int(steps_np.max())
    out = _run(hessian_matvec, optimizer, num_steps, grad, theta_u, jnp.asarray(steps_np))
    return AdamPath(jnp.asarray(steps_np), out, num_steps)


def low_rank_hessian_matvec(eigenvalues, eigenvectors, lambda_perp, shape) -> Callable:
    r"""x -> (V_k Lambda_k V_k^T + lambda_perp (I - V_k V_k^T)) x: H from top-k eigenpairs.

    The closure of theory.md s.4 as an operator: the remainder of the space gets the single
    curvature lambda_perp (the Rayleigh quotient of H along g_perp; see
    :func:`theory.truncated_closure_inputs`). Costs no HVP per application.

    Args:
      eigenvalues: ``(k,)``; eigenvectors: orthonormal columns ``(n, k)`` over flattened
        parameters; lambda_perp: scalar; shape: the parameter shape (n entries), for reshaping.

    Returns:
      A jax-traceable matvec on parameter-shaped arrays, for :func:`adam_on_quadratic`.

    >>> import numpy as np
    >>> mv = low_rank_hessian_matvec(np.array([3.0]), np.array([[1.0], [0.0]]), 0.5, (2,))
    >>> np.asarray(mv(np.array([1.0, 1.0]))).tolist()
    [3.0, 0.5]
    """
    lam = jnp.asarray(eigenvalues)
    vecs = jnp.asarray(eigenvectors)
    rest = jnp.asarray(lambda_perp, vecs.dtype)
    shape = tuple(shape)

    def matvec(x):
        flat = x.reshape(-1)
        coords = vecs.T @ flat
        return (vecs @ ((lam - rest) * coords) + rest * flat).reshape(shape)

    return matvec


def readouts_along(value: dict, theta_u, displacement, *, presence: Callable | None = None) -> dict:
    """Each readout evaluated at the predicted points theta_u + x_T (exact, not first order).

    Args:
      value: name -> function theta -> scalar, e.g. ``theory.readouts(...).value``.
      theta_u: start point; displacement: ``(S, *theta_u.shape)`` from :func:`adam_on_quadratic`
        (or any predicted path, e.g. GD's closed form minus theta_u).
      presence: optional theta -> presence (:func:`theory.presence_readout`); reported as
        ``"presence"``.

    Returns:
      dict name -> ``(S,)`` NumPy array of predicted readout values.
    """
    funcs = dict(value)
    if presence is not None:
        funcs["presence"] = presence
    points = jnp.asarray(theta_u)[None] + jnp.asarray(displacement)
    return {name: np.asarray(jax.vmap(f)(points)) for name, f in funcs.items()}
