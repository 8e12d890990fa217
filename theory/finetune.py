"""Benign fine-tuning: full-batch GD in closed form, and optax simulations (GD, SGD, Adam).

The closed form follows theory.md section 4: in the eigenbasis of the (constant) Hessian,
theta_T - theta_u = -sum_i a_i(T) <g, v_i> v_i with a_i from :func:`theory.law.gd_amplification`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory import _checks
from theory.law import gd_amplification, predict_rho
from theory.problem import DataDistribution, LinearDiffusionProblem
from theory.quadratic import (
    HessianEigen,
    diffusion_grad,
    diffusion_loss,
    eigen_coordinates,
    from_eigen_coordinates,
    hessian_eigen,
    second_moments,
)

__all__ = [
    "FinetuneSetup",
    "finetune_setup",
    "check_gd_step_size",
    "gd_closed_form",
    "predicted_rho_closed_form",
    "top_k_closure",
    "GDResult",
    "finetune_gd",
    "Trajectory",
    "simulate_finetune",
]


class FinetuneSetup(NamedTuple):
    """Everything the resurgence law needs about one fine-tuning problem.

    Attributes:
      moments: S_t of the fine-tuning distribution, ``(L, d+m, d+m)``.
      eigen: eigenpairs of the fine-tuning Hessian.
      grad: g = grad L_ft(theta_u), ``(L, d, d+m)``.
      delta: theta_u - theta_0, ``(L, d, d+m)``.
    """

    moments: jax.Array
    eigen: HessianEigen
    grad: jax.Array
    delta: jax.Array

    def law_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(eigenvalues, grad_coords, delta_coords) flattened for :func:`theory.predict_rho`."""
        g = eigen_coordinates(self.grad, self.eigen)
        dc = eigen_coordinates(self.delta, self.eigen)
        lam = jnp.broadcast_to(self.eigen.eigenvalues[:, None, :], g.shape)
        return lam.reshape(-1), g.reshape(-1), dc.reshape(-1)

    def eigenspace_law_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`law_inputs` with each eigenvalue's d copies merged, shape ``(L (d+m),)`` each.

        The law needs only sum_i a_i g_i dc_i and sum_i dc_i^2, and a_i is one number per
        eigenspace: coordinates (sum g dc / ||dc||, ||dc||) over each eigenspace give both
        sums, so :func:`theory.predict_rho` gives the same rho with d times fewer evaluations.
        """
        g = eigen_coordinates(self.grad, self.eigen)
        dc = eigen_coordinates(self.delta, self.eigen)
        norm = jnp.sqrt(jnp.sum(dc**2, axis=-2))  # (L, n)
        cross = jnp.sum(g * dc, axis=-2)
        g_merged = jnp.where(norm > 0, cross / jnp.where(norm > 0, norm, 1.0), 0.0)
        return self.eigen.eigenvalues.reshape(-1), g_merged.reshape(-1), norm.reshape(-1)


def finetune_setup(
    problem: LinearDiffusionProblem, data: DataDistribution, theta_u: jax.Array, theta_0: jax.Array
) -> FinetuneSetup:
    """Moments, Hessian eigenpairs, gradient at theta_u and the unlearning displacement."""
    moments = second_moments(problem, data)
    eigen = hessian_eigen(moments, problem.schedule)
    grad = diffusion_grad(theta_u, moments, problem.schedule)
    return FinetuneSetup(moments, eigen, grad, theta_u - theta_0)


def check_gd_step_size(lr, eigen: HessianEigen) -> float:
    """Raise ``ValueError`` unless 0 < lr < 2 / lambda_max (GD on a quadratic diverges otherwise)."""
    lam_max = float(eigen.lambda_max)
    limit = 2.0 / lam_max if lam_max > 0 else np.inf
    return _checks.finite_float("lr", lr, low=0.0, high=limit, low_open=True, high_open=True)


def gd_closed_form(setup: FinetuneSetup, theta_u: jax.Array, lr, steps) -> jax.Array:
    """theta_T after T full-batch GD steps, exactly, for every T in ``steps``.

    Args:
      setup: from :func:`finetune_setup`.
      theta_u: start point, ``(L, d, d+m)``.
      lr: step size (no check here so that it can be vmapped; see :func:`check_gd_step_size`).
      steps: ``(S,)`` integer step counts.

    Returns:
      Shape ``(S, L, d, d+m)``.
    """
    g = eigen_coordinates(setup.grad, setup.eigen)  # (L, d, n)
    amp = gd_amplification(setup.eigen.eigenvalues, lr, steps)  # (S, L, n)
    moved = -amp[:, :, None, :] * g[None]
    return theta_u[None] + from_eigen_coordinates(moved, setup.eigen)


def predicted_rho_closed_form(setup: FinetuneSetup, lr, steps) -> jax.Array:
    """rho(T) from the law with all eigenpairs: shape ``(S,)``."""
    lam, g, dc = setup.eigenspace_law_inputs()
    return predict_rho(lam, g, dc, lr, steps)


def top_k_closure(eigen: HessianEigen, grad_coords: jax.Array, ranks) -> list:
    """For each k in ``ranks``: which eigen-coordinates lie in the top-k eigenspaces, and the
    closure curvature lambda_perp = g_perp^T H g_perp / ||g_perp||^2 of the rest (theory.md s.4).

    Args:
      eigen: block eigendecomposition (eigenvalues ``(L, n)``, each of multiplicity d).
      grad_coords: <g, v> in that basis, ``(L, d, n)``.
      ranks: the k values (static ints), counting eigenspaces over all levels.

    Returns:
      list of ``(top, lambda_perp)``: a boolean mask ``(L, d, n)`` and a scalar (0 if g_perp = 0).
    """
    lam = eigen.eigenvalues
    order = jnp.argsort(-lam.reshape(-1))
    rank_of = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0])).reshape(lam.shape)
    weighted = jnp.broadcast_to(lam[:, None, :], grad_coords.shape) * grad_coords**2
    out = []
    for k in ranks:
        top = jnp.broadcast_to((rank_of < k)[:, None, :], grad_coords.shape)
        rest_sq = jnp.sum(jnp.where(top, 0.0, grad_coords**2))
        safe = jnp.where(rest_sq > 0, rest_sq, 1.0)
        lambda_perp = jnp.where(rest_sq > 0, jnp.sum(jnp.where(top, 0.0, weighted)) / safe, 0.0)
        out.append((top, lambda_perp))
    return out


class GDResult(NamedTuple):
    """Closed-form full-batch GD fine-tuning.

    Attributes:
      steps: ``(S,)``; params: theta_T, ``(S, L, d, d+m)``; rho: resurgence from the law, ``(S,)``;
      setup: the :class:`FinetuneSetup` (Hessian eigenpairs, g, delta).
    """

    steps: jax.Array
    params: jax.Array
    rho: jax.Array
    setup: FinetuneSetup


def finetune_gd(
    problem: LinearDiffusionProblem,
    data: DataDistribution,
    theta_u: jax.Array,
    theta_0: jax.Array,
    lr: float,
    steps,
) -> GDResult:
    """Checked entry point: exact full-batch GD from theta_u on L_ft at every T in ``steps``.

    Raises:
      ValueError: lr outside (0, 2 / lambda_max) (GD diverges there), or negative / non-integer
        step counts.
    """
    steps_np = np.asarray(steps)
    if steps_np.ndim != 1 or not np.issubdtype(steps_np.dtype, np.integer) or np.any(steps_np < 0):
        raise ValueError(f"`steps` must be a 1-D array of integers >= 0; got {steps!r}.")
    setup = finetune_setup(problem, data, theta_u, theta_0)
    lr = check_gd_step_size(lr, setup.eigen)
    steps_j = jnp.asarray(steps_np)
    return GDResult(
        steps_j,
        gd_closed_form(setup, theta_u, lr, steps_j),
        predicted_rho_closed_form(setup, lr, steps_j),
        setup,
    )


class Trajectory(NamedTuple):
    """Observables recorded along an optimizer run.

    Attributes:
      steps: step counts at which values were recorded, ``(R,)``.
      rho: parameter-space resurgence, ``(R,)``.
      finetune_loss: exact L_ft, ``(R,)``.
      forget_loss: exact L_f (NaN if no forget distribution was given), ``(R,)``.
      params: theta at each record, ``(R, L, d, d+m)`` (only when ``keep_params``), else None.
    """

    steps: jax.Array
    rho: jax.Array
    finetune_loss: jax.Array
    forget_loss: jax.Array
    params: jax.Array | None


def _sample_minibatch_grad(key, theta, problem, data, batch_size):
    """Monte-Carlo gradient from ``batch_size`` fresh samples of the generator (all levels each)."""
    k_prompt, k_drop, k_x, k_eps = jax.random.split(key, 4)
    idx = jax.random.choice(k_prompt, data.probs.shape[0], (batch_size,), p=data.probs)
    keep = jax.random.uniform(k_drop, (batch_size,)) >= data.p_null
    c = jnp.where(keep[:, None], data.embeddings.T[idx], 0.0)
    chol = jnp.linalg.cholesky(problem.covariance)
    x0 = data.means.T[idx] + jax.random.normal(k_x, (batch_size, problem.dim), theta.dtype) @ chol.T
    sched = problem.schedule
    eps = jax.random.normal(k_eps, (sched.num_levels, batch_size, problem.dim), theta.dtype)
    x_t = sched.alphas[:, None, None] * x0[None] + sched.sigmas[:, None, None] * eps

    def loss(params):
        w, v = params[..., : problem.dim], params[..., problem.dim :]
        pred = jnp.einsum("lij,lbj->lbi", w, x_t) + jnp.einsum("lij,bj->lbi", v, c)
        per_level = jnp.mean(jnp.sum((pred - eps) ** 2, axis=-1), axis=-1)
        return jnp.sum(sched.weights * per_level)

    return jax.grad(loss)(theta)


def simulate_finetune(
    problem: LinearDiffusionProblem,
    data: DataDistribution,
    theta_u: jax.Array,
    theta_0: jax.Array,
    optimizer: optax.GradientTransformation,
    steps: int,
    *,
    forget: DataDistribution | None = None,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    record_every: int = 1,
    keep_params: bool = False,
) -> Trajectory:
    """Run ``optimizer`` on L_ft from theta_u inside ``lax.scan`` and record the observables.

    Full-batch (exact gradient) when ``batch_size`` is None, else minibatch SGD with samples drawn
    from the generator with ``key``. Records at steps 0, record_every, 2 record_every, ...

    Raises:
      ValueError: steps < 1, record_every not dividing steps, batch_size < 1, or a minibatch run
        without a key.
    """
    steps = _checks.positive_int("steps", steps)
    record_every = _checks.positive_int("record_every", record_every)
    if steps % record_every:
        raise ValueError(f"`record_every` must divide `steps`; got record_every={record_every}, steps={steps}.")
    if batch_size is not None:
        _checks.positive_int("batch_size", batch_size)
        if key is None:
            raise ValueError("`key` is required for minibatch simulation (batch_size is set).")
    key = jax.random.PRNGKey(0) if key is None else key
    moments = second_moments(problem, data)
    forget_moments = None if forget is None else second_moments(problem, forget)
    sched = problem.schedule

    def observe(theta):
        f_loss = jnp.nan if forget_moments is None else diffusion_loss(theta, forget_moments, sched)
        return rho(theta), diffusion_loss(theta, moments, sched), f_loss

    delta = theta_u - theta_0
    delta_sq = jnp.sum(delta**2)

    def rho(theta):
        return -jnp.sum((theta - theta_u) * delta) / delta_sq

    def one_step(carry, step_key):
        params, state = carry
        if batch_size is None:
            grad = diffusion_grad(params, moments, sched)
        else:
            grad = _sample_minibatch_grad(step_key, params, problem, data, batch_size)
        updates, state = optimizer.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), None

    def block(carry, block_key):
        carry, _ = jax.lax.scan(one_step, carry, jax.random.split(block_key, record_every))
        params = carry[0]
        return carry, (observe(params), params if keep_params else None)

    n_records = steps // record_every
    carry0 = (theta_u, optimizer.init(theta_u))
    _, (obs, params) = jax.lax.scan(block, carry0, jax.random.split(key, n_records))
    obs0 = observe(theta_u)
    stack = [jnp.concatenate([jnp.atleast_1d(o0), o]) for o0, o in zip(obs0, obs, strict=True)]
    all_params = jnp.concatenate([theta_u[None], params]) if keep_params else None
    record_steps = jnp.arange(n_records + 1) * record_every
    return Trajectory(record_steps, stack[0], stack[1], stack[2], all_params)
