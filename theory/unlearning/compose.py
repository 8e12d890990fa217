r"""Composition of target x mask x solver into an unlearning method, and :func:`unlearn`.

The objective of a method erasing the concepts F while retaining the prompts R is

.. math:: J(\theta) = \sum_t w_t\Big[\sum_{f\in F} J^{forget}_{t,f}(\theta_t)
          + \beta \sum_{p\in R} E_p\|(\theta_t - \theta_{0,t}) z_p\|^2
          + \lambda \|\theta_t - \theta_{0,t}\|^2\Big]

(beta = ``retain_weight``, lambda = ``proximity``; retain data x_0 ~ N(A c_p, Sigma) under prompt
c_p), minimised over the entries the mask frees, starting from the mask's start point. Sums over
concepts (not means) make the V-only anchor method exactly UCE's formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from theory import _checks
from theory.problem import LinearDiffusionProblem
from theory.unlearning.masks import MASKS, Mask, get_mask
from theory.unlearning.solvers import SOLVERS, Solver, get_solver
from theory.unlearning.targets import TARGETS, Quadratic, Target, get_target, prompt_moments

__all__ = [
    "UnlearningMethod",
    "compose",
    "resolve_concepts",
    "unlearning_objective",
    "forget_objective",
    "unlearn_with",
]


@dataclasses.dataclass(frozen=True)
class UnlearningMethod:
    """target x mask x solver plus the retain and proximity strengths.

    Attributes:
      target, mask, solver: the three parts.
      retain_weight: beta >= 0 on the retain term.
      proximity: lambda >= 0 on ||theta - theta_0||^2.
      name: label for reports.
    """

    target: Target
    mask: Mask
    solver: Solver
    retain_weight: float = 1.0
    proximity: float = 0.0
    name: str = "custom"

    def __post_init__(self):
        _checks.finite_float("retain_weight", self.retain_weight, low=0.0)
        _checks.finite_float("proximity", self.proximity, low=0.0)


def compose(
    target, mask, solver, *, retain_weight=1.0, proximity=0.0, name="custom"
) -> UnlearningMethod:
    """Compose an unlearning method (optax ``chain``'s role). Parts may be given by registry name.

    >>> m = compose("null", "v_only", "closed_form", proximity=0.1)
    >>> (m.target.name, m.mask.name, m.solver.name)
    ('null', 'v_only', 'closed_form')

    Raises:
      ValueError: unknown part names (listing the valid ones), negative weights.
    """
    return UnlearningMethod(
        target=get_target(target) if isinstance(target, str) else target,
        mask=get_mask(mask) if isinstance(mask, str) else mask,
        solver=get_solver(solver) if isinstance(solver, str) else solver,
        retain_weight=float(retain_weight),
        proximity=float(proximity),
        name=name,
    )


def resolve_concepts(
    problem: LinearDiffusionProblem, forget, retain
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check ``forget`` (int or ints) and ``retain`` (None = every other concept, or ints).

    Raises:
      ValueError: empty, repeated or out-of-range indices, or retain overlapping forget.
    """
    k = problem.num_concepts
    forget_t = tuple(int(f) for f in np.atleast_1d(np.asarray(forget, dtype=object)))
    if (
        not forget_t
        or len(set(forget_t)) != len(forget_t)
        or any(f < 0 or f >= k for f in forget_t)
    ):
        raise ValueError(
            f"`forget` must be distinct concept indices in [0, {k - 1}]; got {forget!r}."
        )
    if retain is None:
        retain_t = tuple(j for j in range(k) if j not in forget_t)
    else:
        retain_t = tuple(int(j) for j in np.atleast_1d(np.asarray(retain, dtype=object)))
        if len(set(retain_t)) != len(retain_t) or any(j < 0 or j >= k for j in retain_t):
            raise ValueError(
                f"`retain` must be distinct concept indices in [0, {k - 1}]; got {retain!r}."
            )
        if set(retain_t) & set(forget_t):
            raise ValueError(
                f"`retain` {retain_t} overlaps `forget` {forget_t}: a concept cannot be both erased and kept."
            )
    return forget_t, retain_t


def forget_objective(
    problem, theta_0, target: Target, forget: Sequence[int], retain: Sequence[int]
) -> Quadratic:
    """Sum of the target's forget terms over the erased concepts (mass erasure)."""
    total = None
    for f in forget:
        term = target.forget_quadratic(problem, theta_0, f, tuple(retain))
        total = term if total is None else total.plus(term)
    return total


def unlearning_objective(
    problem, theta_0, method: UnlearningMethod, forget, retain
) -> tuple[Quadratic, Quadratic]:
    """(forget term, full objective) of ``method`` as per-level quadratics (module docstring)."""
    forget_q = forget_objective(problem, theta_0, method.target, forget, retain)
    total = forget_q
    if method.retain_weight > 0:
        for p in retain:
            s, _ = prompt_moments(problem, problem.embeddings[:, p], problem.concept_means[:, p])
            total = total.plus(Quadratic(s, theta_0 @ s), method.retain_weight)
    if method.proximity > 0:
        n = theta_0.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(n, dtype=theta_0.dtype), total.hess.shape)
        total = total.plus(Quadratic(eye, theta_0), method.proximity)
    return forget_q, total


def unlearn_with(
    problem: LinearDiffusionProblem, theta_0, method: UnlearningMethod, forget, retain=None
):
    """Apply a composed method; returns (theta_u, mask). See :func:`theory.unlearning.unlearn`.

    Raises:
      ValueError: bad concept indices, or a method that needs retain prompts given none.
    """
    total, mask, start = solver_inputs(problem, theta_0, method, forget, retain)
    return method.solver.solve(total, problem.schedule.weights, mask, start), mask


def solver_inputs(
    problem: LinearDiffusionProblem, theta_0, method: UnlearningMethod, forget, retain=None
):
    """(objective, mask, start) that ``method``'s solver receives (arguments: :func:`unlearn_with`).

    Raises:
      ValueError: bad concept indices, or a method that needs retain prompts given none.
    """
    forget_t, retain_t = resolve_concepts(problem, forget, retain)
    if method.target.needs_retain and (not retain_t or method.retain_weight == 0):
        raise ValueError(
            f"method `{method.name}` (target `{method.target.name}`) needs a non-empty retain set with "
            f"retain_weight > 0; got retain={retain_t}, retain_weight={method.retain_weight}."
        )
    if method.mask.name == "reset_repair" and not retain_t:
        raise ValueError(
            f"method `{method.name}` (mask `reset_repair`) repairs on retain prompts; got none."
        )
    forget_q, total = unlearning_objective(problem, theta_0, method, forget_t, retain_t)
    weights = problem.schedule.weights
    mask, start = method.mask.select(theta_0, forget_q.grad(theta_0, weights), problem.dim)
    return total, mask, start


# Registries the error messages are generated from (re-exported for the CLI and tests).
PART_REGISTRIES = {"target": TARGETS, "mask": MASKS, "solver": SOLVERS}
