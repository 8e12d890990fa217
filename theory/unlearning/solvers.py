r"""Solvers for the masked unlearning quadratic (theory.md s.3).

The objective is sum_t w_t [tr(theta_t Q_t theta_t^T) - 2 tr(theta_t B_t^T)] with entries outside
the mask fixed at ``start``. Rows of theta_t are independent, so the closed form solves, per level
t and row i with free set F (the mask of that row), the masked normal equations

.. math:: Q_{FF}\,\Delta_F = (B_i - \mathrm{start}_i\,Q)_F,\qquad \theta_i = \mathrm{start}_i + \Delta .

For the V-only mask this is ridge regression in prompt space (UCE's formula). It is written with
fixed shapes as (P Q P + I - P) Delta = P r with P = diag(mask row), and solved with a Hermitian
pseudo-inverse, so a singular Q_FF gives the minimum-norm displacement from ``start``.
The optax solver runs an optimizer for n steps in ``lax.scan`` on the masked gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from theory import _checks
from theory.unlearning.targets import Quadratic

__all__ = ["Solver", "SOLVERS", "closed_form", "optax_solver", "get_solver"]

# Relative eigenvalue cut-off of the pseudo-inverse: eigenvalues below 1e-10 x largest are exact
# zeros (prompt directions that no forget/retain prompt touches), not curvature.
_PINV_RTOL = 1e-10
# A masked Q_FF with an eigenvalue below -1e-9 x its largest makes the objective unbounded.
_NEGATIVE_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Solver:
    """A solver: ``solve(objective, weights (L,), mask (L,d,n), start (L,d,n)) -> theta``."""

    name: str
    solve: Callable


def _masked_systems(objective: Quadratic, mask, start):
    q = objective.hess[:, None]  # (L, 1, n, n)
    p = mask[..., :, None] * mask[..., None, :]  # (L, d, n, n)
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    system = p * q + eye * (1.0 - mask)[..., None, :]
    rhs = mask * (objective.lin - start @ objective.hess)
    return system, rhs


@jax.jit
def _solve_masked(objective: Quadratic, mask, start):
    system, rhs = _masked_systems(objective, mask, start)
    delta = jnp.einsum(
        "ldij,ldj->ldi", jnp.linalg.pinv(system, rtol=_PINV_RTOL, hermitian=True), rhs
    )
    return start + mask * delta  # exact zeros off the mask (pinv leaves round-off there)


@jax.jit
def masked_curvature_range(objective: Quadratic, mask, start):
    """(smallest eigenvalue, largest |eigenvalue|) of the masked systems the closed form solves."""
    system, _ = _masked_systems(objective, mask, start)
    lam = jnp.linalg.eigvalsh(system)
    return jnp.min(lam), jnp.max(jnp.abs(lam))


def raise_if_unbounded(lam_min, scale) -> None:
    """Raise ``ValueError`` when the masked objective has a negative curvature (no minimiser),
    from the values of :func:`masked_curvature_range`."""
    if float(lam_min) < -_NEGATIVE_RTOL * max(float(scale), 1e-300):
        raise ValueError(
            f"the masked unlearning objective is unbounded below (smallest curvature "
            f"{float(lam_min):.3g}); the closed form has no minimiser. Increase `proximity` or "
            "`retain_weight`, or use the `optax` solver for a finite number of steps."
        )


def closed_form() -> Solver:
    """Exact minimiser of the masked quadratic (minimum-norm displacement where it is flat).

    Raises (when solving):
      ValueError: the masked objective is unbounded below (e.g. gradient ascent without enough
        retain weight or proximity); use the optax solver for a finite number of steps instead.
    """

    def solve(objective: Quadratic, weights, mask, start):
        lam_min, scale = masked_curvature_range(objective, mask, start)
        # Under jit/vmap (sweeps) the values are traced: the sweep engine runs this check once
        # per configuration group instead (theory.sweep.check_unlearning).
        if not isinstance(lam_min, jax.core.Tracer):
            raise_if_unbounded(lam_min, scale)
        return _solve_masked(objective, mask, start)

    return Solver("closed_form", solve)


def optax_solver(optimizer: optax.GradientTransformation | None = None, steps: int = 200) -> Solver:
    """Run ``optimizer`` (default Adam, lr 1e-2) for ``steps`` full-batch steps from ``start``.

    Gradients outside the mask are zeroed and masked entries are re-pinned after every update,
    so optimizers with weight decay cannot move them either.

    Raises:
      ValueError: steps < 1.
    """
    steps = _checks.positive_int("steps", steps)
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer

    @jax.jit
    def run(objective: Quadratic, weights, mask, start):
        def step(carry, _):
            theta, state = carry
            grad = mask * objective.grad(theta, weights)
            updates, state = optimizer.update(grad, state, theta)
            theta = optax.apply_updates(theta, updates)
            return (start + mask * (theta - start), state), None

        (theta, _), _ = jax.lax.scan(step, (start, optimizer.init(start)), None, length=steps)
        return theta

    return Solver("optax", run)


SOLVERS: dict[str, Callable[..., Solver]] = {"closed_form": closed_form, "optax": optax_solver}


def get_solver(name: str, **kwargs) -> Solver:
    """Build a solver from its registry name.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    return _checks.registry_lookup("solver", name, SOLVERS)(**kwargs)
