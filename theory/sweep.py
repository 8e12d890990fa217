r"""One resurgence scenario as a pure, vmappable function of scalar knobs (the sweep kernel).

A scenario is: a random problem (as :func:`theory.make_problem` draws it from ``seed``), the
Bayes-optimal pretrained point theta_0, an unlearning edit erasing the first ``num_erased``
concepts, benign fine-tuning, and every observable of theory.md section 4 at the requested step
counts. All knobs in :data:`DYNAMIC_KNOBS` are traced scalars, so ``jax.vmap`` over a grid of them
compiles once; sizes and code choices (unlearning method, optimizer, number of erased concepts)
live in :class:`ScenarioStatic` (a hashable jit-static arg): one compiled function per choice, so
each configuration runs only its own method's unlearning and its own optimizer.

The work splits in two stages. :func:`prepare_scenario` depends on the *problem knobs*
(:data:`PROBLEM_KNOBS`: everything but ``lr``) and does the expensive part once per distinct
problem: the problem, theta_0, the unlearning edit, the fine-tuning moments and the Hessian
eigendecomposition. :func:`scenario_observables` evaluates everything that depends on ``lr``
(the law, closed-form GD or the optax simulation, presence at theta_T) from it.
:func:`run_grid` vmaps the first over problems and the second over learning rates, so a grid
over lr x T repeats no eigendecomposition. The sweep engine jits the stages apart: the
preparation as its three parts (:func:`base_grid` per sizes, :func:`unlearn_grid` per method and
erased count, :func:`finish_grid` shared by every method), :func:`observe_grid` per optimizer.

Fine-tuning prompts (``finetune``):

* ``"constructed"``: one prompt c = sqrt(curvature) (cos(angle) r_hat + sin(angle) u), where
  r = M^{-1} c_f is the erased direction of the first erased concept (theory.md s.4 (c)) and u a
  random unit vector orthogonal to it: ``overlap_angle`` is then exactly the principal angle
  between r and the fine-tuning embedding subspace, and ``curvature`` scales its Hessian block.
* ``"other_concepts"``: the retained concepts, uniformly, embeddings scaled by sqrt(curvature)
  (a preserve set protects against these: UCE keeps V c_p fixed, so r is nearly orthogonal to them).
* ``"new_concepts"``: NEW_PROMPTS unseen prompts sqrt(rho_c) c_common + sqrt(1 - rho_c) u_j sharing
  the concepts' common component (u_j random, orthogonal to c_common), scaled by sqrt(curvature);
  overlap with r then comes from the shared component rho_c (theory.md s.4 (c)).

Fine-tuning images come from the true generator, shifted by ``target_shift`` * B c (new concepts,
B random) and with null-prompt dropout ``p_null``; both make theta_0 sub-optimal (a drift term).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory._backend import FAST_COMPILE_OPTIONS
from theory.finetune import (
    FinetuneSetup,
    finetune_setup,
    gd_closed_form,
    predicted_rho_closed_form,
    top_k_closure,
)
from theory.law import predict_rho_truncated
from theory.observables import angles_between_orthonormal, curvature_along_delta, spectral_weights
from theory.observables import rho as rho_observable
from theory.presence import incidental_presence_matrix
from theory.pretrain import bayes_optimal_denoiser
from theory.problem import DataDistribution, LinearDiffusionProblem, make_noise_schedule
from theory.quadratic import (
    diffusion_grad,
    diffusion_loss,
    eigen_coordinates,
    second_moments,
    split_params,
)
from theory.unlearning import get_method, unlearn_with
from theory.unlearning.compose import solver_inputs
from theory.unlearning.solvers import masked_curvature_range, raise_if_unbounded

__all__ = [
    "DYNAMIC_KNOBS",
    "PROBLEM_KNOBS",
    "INT_KNOBS",
    "FINETUNE_MODES",
    "OPTIMIZERS",
    "ScenarioStatic",
    "ScenarioState",
    "scenario_problem",
    "ScenarioBase",
    "base_scenario",
    "unlearn_scenario",
    "finish_scenario",
    "prepare_scenario",
    "scenario_observables",
    "run_scenario",
    "prepare_grid",
    "base_grid",
    "unlearn_grid",
    "finish_grid",
    "observe_grid",
    "run_grid",
    "check_unlearning",
]

# Traced scalar knobs (one value per configuration) and their defaults.
DYNAMIC_KNOBS: dict[str, float] = {
    "seed": 0,
    "common_component": 0.3,
    "spectrum_decay": 1.0,
    "generator_scale": 1.0,
    "overlap_angle": 0.5,
    "curvature": 1.0,
    "p_null": 0.0,
    "target_shift": 0.0,
    "lr": 0.5,
}
# The knobs that define the problem (all but lr): the unit of work :func:`prepare_scenario` shares.
PROBLEM_KNOBS = tuple(k for k in DYNAMIC_KNOBS if k != "lr")
INT_KNOBS = ("seed",)
PRESENCE_SAMPLES = 1024  # Monte-Carlo samples per presence value: standard error <= 0.5/32 ~ 0.016
FINETUNE_MODES = ("constructed", "other_concepts", "new_concepts")
NEW_PROMPTS = 3  # prompts of the "new_concepts" fine-tuning set
OPTIMIZERS = ("gd_closed_form", "gd", "adam")
_EXTRA_KEY = 7  # fold_in tag for randomness beyond make_problem's (directions, target shift)


@dataclasses.dataclass(frozen=True)
class ScenarioStatic:
    """Sizes and code choices of a scenario group (hashable: a jit static argument).

    Attributes:
      dim, embed_dim, num_concepts, num_levels: d, m, K, L.
      method: unlearning method (a name in :data:`theory.unlearning.METHOD_NAMES`).
      optimizer: a name in :data:`OPTIMIZERS` (``gd_closed_form`` is exact GD; ``gd`` and ``adam``
        run optax in ``lax.scan`` on the exact gradient).
      num_erased: number n of erased concepts (concepts 0..n-1, the rest retained).
      max_erased: width of ``principal_angles`` (NaN-padded past ``num_erased``), so that groups
        with different ``num_erased`` give outputs of one shape; 0 means ``num_erased``.
      finetune: one of :data:`FINETUNE_MODES`.
      steps: recorded step counts T (sorted, >= 0).
      truncation_ranks: k values of the truncated closure rho_k (top-k Hessian eigenspaces, each
        of multiplicity d).
    """

    dim: int = 16
    embed_dim: int = 8
    num_concepts: int = 5
    num_levels: int = 10
    method: str = "uce"
    optimizer: str = "gd_closed_form"
    num_erased: int = 1
    max_erased: int = 0
    finetune: str = "constructed"
    steps: tuple[int, ...] = (0, 10, 100)
    truncation_ranks: tuple[int, ...] = (1, 4)

    @property
    def angle_slots(self) -> int:
        return max(self.num_erased, self.max_erased)

    def for_prepare(self) -> ScenarioStatic:
        """The fields :func:`prepare_scenario` reads (the rest at defaults): the prepared state of
        one method and erased count, shared by every optimizer, step list and truncation."""
        default = ScenarioStatic()
        return dataclasses.replace(
            self,
            optimizer=default.optimizer,
            steps=default.steps,
            truncation_ranks=default.truncation_ranks,
        )

    def for_base(self) -> ScenarioStatic:
        """The fields :func:`base_scenario` reads (sizes only): one compile for every method."""
        default = ScenarioStatic()
        return dataclasses.replace(
            self.for_prepare(), method=default.method, num_erased=1, max_erased=0,
            finetune=default.finetune,
        )

    def for_unlearn(self) -> ScenarioStatic:
        """The fields :func:`unlearn_scenario` reads (sizes, method, erased count)."""
        return dataclasses.replace(
            self.for_base(), method=self.method, num_erased=self.num_erased,
            max_erased=self.max_erased,
        )

    def for_finish(self) -> ScenarioStatic:
        """The fields :func:`finish_scenario` reads (all of :meth:`for_prepare` but the method):
        one compile shared by every unlearning method."""
        return dataclasses.replace(self.for_prepare(), method=ScenarioStatic.method)

    def for_observables(self) -> ScenarioStatic:
        """The fields :func:`scenario_observables` reads: one compile per optimizer, shared by
        every method and erased count (they live in the prepared state)."""
        return dataclasses.replace(
            self, method=ScenarioStatic.method, num_erased=1, max_erased=self.angle_slots
        )


def scenario_problem(static: ScenarioStatic, knobs: dict) -> LinearDiffusionProblem:
    """The problem :func:`theory.make_problem` draws from ``PRNGKey(seed)``, with traced knobs."""
    return _problem_and_common(static, knobs)[0]


def _problem_and_common(static: ScenarioStatic, knobs: dict):
    d, m, k = static.dim, static.embed_dim, static.num_concepts
    key = jax.random.PRNGKey(knobs["seed"])
    k_basis, k_gen, k_emb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_basis, (d, d)))
    spectrum = jnp.arange(1, d + 1, dtype=q.dtype) ** (-knobs["spectrum_decay"])
    covariance = (q * spectrum) @ q.T
    covariance = 0.5 * (covariance + covariance.T)
    generator = jax.random.normal(k_gen, (d, m), dtype=q.dtype) * (
        knobs["generator_scale"] / np.sqrt(m)
    )
    basis, _ = jnp.linalg.qr(jax.random.normal(k_emb, (m, k + 1)))
    rho_c = knobs["common_component"]
    embeddings = jnp.sqrt(rho_c) * basis[:, :1] + jnp.sqrt(1.0 - rho_c) * basis[:, 1:]
    problem = LinearDiffusionProblem(
        generator, covariance, embeddings, make_noise_schedule(static.num_levels)
    )
    return problem, basis[:, 0]


def _erase_mask(static: ScenarioStatic, num_erased: int) -> jax.Array:
    return (jnp.arange(static.num_concepts) < num_erased).astype(jnp.float64)


def _unit(x):
    return x / jnp.linalg.norm(x)


def _finetune_distribution(static, problem, knobs, erased, erased_direction, extra_key, common):
    k_u, k_shift, k_new = jax.random.split(extra_key, 3)
    m = static.embed_dim
    scale = jnp.sqrt(knobs["curvature"])
    if static.finetune == "constructed":
        r_hat = _unit(erased_direction)
        u = jax.random.normal(k_u, (m,), dtype=r_hat.dtype)
        u = _unit(u - (u @ r_hat) * r_hat)
        angle = knobs["overlap_angle"]
        emb = (scale * (jnp.cos(angle) * r_hat + jnp.sin(angle) * u))[:, None]
        probs = jnp.ones((1,), emb.dtype)
    elif static.finetune == "new_concepts":
        raw = jax.random.normal(k_new, (m, NEW_PROMPTS), dtype=common.dtype)
        raw = raw - common[:, None] * (common @ raw)[None]
        rho_c = knobs["common_component"]
        unit = jnp.sqrt(rho_c) * common[:, None] + jnp.sqrt(1.0 - rho_c) * raw / jnp.linalg.norm(
            raw, axis=0
        )
        emb = scale * unit
        probs = jnp.full((NEW_PROMPTS,), 1.0 / NEW_PROMPTS, emb.dtype)
    else:
        emb = scale * problem.embeddings
        retained = 1.0 - erased
        probs = retained / jnp.sum(retained)
    shift = jax.random.normal(k_shift, (static.dim, m), dtype=emb.dtype) / np.sqrt(m)
    means = (problem.generator + knobs["target_shift"] * shift) @ emb
    return DataDistribution(emb, means, probs, jnp.asarray(knobs["p_null"], emb.dtype))


def _angles(forget_basis, forget_weights, ft_embeddings, ft_probs):
    """Principal angles (ascending, radians) between span(forget columns) and span(ft prompts).

    Columns with weight 0 are excluded; angles beyond the smaller rank are NaN. Shape ``(p,)``.
    """

    def range_basis(vectors, weights):
        gram = (vectors * weights) @ vectors.T
        lam, vecs = jnp.linalg.eigh(gram)
        # Relative cut-off: exact zeros of a rank-deficient Gram matrix sit at round-off level.
        keep = lam > 1e-10 * jnp.max(lam)
        return vecs * keep, jnp.sum(keep)

    qa, ra = range_basis(forget_basis, forget_weights)
    qb, rb = range_basis(ft_embeddings, ft_probs)
    return angles_between_orthonormal(qa, qb, ra, rb)[: forget_basis.shape[1]]


def _truncated(setup, lr, steps, ranks):
    """rho_k(T) for each k: top-k eigenspaces exactly, the remainder as one closure direction.

    The law runs on eigenspaces (one a_i per eigenvalue, as in
    :meth:`theory.finetune.FinetuneSetup.eigenspace_law_inputs`), not on their d copies.
    """
    lam = setup.eigen.eigenvalues  # (L, n)
    g = eigen_coordinates(setup.grad, setup.eigen)  # (L, d, n)
    dc = eigen_coordinates(setup.delta, setup.eigen)
    norm = jnp.sqrt(jnp.sum(dc**2, axis=1))  # (L, n): ||dc|| over each eigenspace
    cross = jnp.sum(g * dc, axis=1)
    g_merged = jnp.where(norm > 0, cross / jnp.where(norm > 0, norm, 1.0), 0.0)
    out = []
    for top, lambda_perp in top_k_closure(setup.eigen, g, ranks):
        top_space = top[:, 0, :]  # the mask is constant over the d copies
        out.append(
            predict_rho_truncated(
                lam.reshape(-1),
                jnp.where(top_space, g_merged, 0.0).reshape(-1),
                norm.reshape(-1),
                lr,
                steps,
                delta_norm_sq=jnp.sum(dc**2),
                grad_perp_dot_delta=jnp.sum(jnp.where(top_space, 0.0, cross)),
                lambda_perp=lambda_perp,
            )
        )
    return jnp.stack(out)


def _unlearn(problem, theta_0, method_name: str, num_erased: int):
    """theta_u from the named method, and the erased embedding directions (columns, (m, n_erased)).

    Traced through :func:`theory.unlearning.unlearn_with`; the closed-form solver's eager
    unboundedness check runs once per group in :func:`check_unlearning`. The erased
    directions are the top right-singular vectors of the V displacement stacked over levels; for
    UCE they span {M^{-1} c_e} exactly (Delta V = sum_e (V0 c_a - V0 c_e) (M^{-1} c_e)^T).
    """
    theta_u, _ = unlearn_with(problem, theta_0, get_method(method_name), tuple(range(num_erased)))
    dv = split_params(theta_u - theta_0, problem.dim)[1].reshape(-1, problem.embed_dim)
    _, _, vh = jnp.linalg.svd(dv, full_matrices=False)
    return theta_u, vh[:num_erased].T


def check_unlearning(static: ScenarioStatic, knobs: dict) -> None:
    """Raise the unlearning method's own errors for one configuration, before the traced sweep.

    The name, options and concept indices are checked always. Only the closed-form solver has a
    data-dependent check (an unbounded masked objective), and only a gradient-ascent target
    (``needs_retain``) can make the objective unbounded: every other forget term, the retain
    terms and the proximity term are positive semi-definite quadratics with weights >= 0. For a
    closed-form method with a gradient-ascent target the curvature range is computed in one
    compiled function and checked here (computed op by op, it compiled ~100 one-op programs per
    sweep, about 3 s of a cold ``resurgence figures``).

    Raises:
      ValueError: from the unlearning method (unknown option, unbounded closed-form objective).
    """
    method = get_method(static.method)
    if method.solver.name != "closed_form" or not method.target.needs_retain:
        return
    problem_knobs = {k: jnp.asarray(knobs[k]) for k in PROBLEM_KNOBS}
    raise_if_unbounded(*_closed_form_curvature_range(static.for_unlearn(), problem_knobs))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE_OPTIONS)
def _closed_form_curvature_range(static: ScenarioStatic, problem_knobs: dict):
    problem = scenario_problem(static, problem_knobs)
    theta_0 = bayes_optimal_denoiser(problem)
    erased = tuple(range(static.num_erased))
    objective, mask, start = solver_inputs(problem, theta_0, get_method(static.method), erased)
    return masked_curvature_range(objective, mask, start)


def _simulate(name, lr, moments, sched, theta_u, steps: tuple[int, ...]):
    """theta_T at each T in ``steps`` for an optax optimizer on the exact loss (one lax.scan)."""
    opt = optax.sgd(lr) if name == "gd" else optax.adam(lr)
    slot = np.full(max(steps) + 1, -1)
    slot[list(steps)] = np.arange(len(steps))
    record = jnp.asarray(slot)

    def step(carry, t):
        params, state, buf = carry
        buf = jnp.where(record[t] >= 0, buf.at[jnp.maximum(record[t], 0)].set(params), buf)
        updates, state = opt.update(diffusion_grad(params, moments, sched), state, params)
        return (optax.apply_updates(params, updates), state, buf), None

    buf = jnp.zeros((len(steps),) + theta_u.shape, theta_u.dtype)
    (_, _, buf), _ = jax.lax.scan(
        step, (theta_u, opt.init(theta_u), buf), jnp.arange(max(steps) + 1)
    )
    return buf



class ScenarioState(NamedTuple):
    """The lr-independent part of a scenario, from :func:`prepare_scenario` (one per problem).

    Attributes:
      problem: the generator; ``theta_0``, ``theta_u``: pretrained and unlearned ``(L, d, d+m)``.
      directions: erased embedding directions ``(m, angle_slots)``, NaN past ``num_erased``.
      erased: 1.0 for erased concepts, 0.0 for retained ones, ``(K,)``.
      finetune: the fine-tuning distribution; ``setup``: its moments, Hessian eigenpairs, the
        gradient at theta_u and delta; ``forget_moments``: S_t of the erased concepts' data.
    """

    problem: LinearDiffusionProblem
    theta_0: jax.Array
    theta_u: jax.Array
    directions: jax.Array
    erased: jax.Array
    finetune: DataDistribution
    setup: FinetuneSetup
    forget_moments: jax.Array


class ScenarioBase(NamedTuple):
    """The method-independent start of a scenario (:func:`base_scenario`): the problem, the
    common embedding component and theta_0."""

    problem: LinearDiffusionProblem
    common: jax.Array
    theta_0: jax.Array


def base_scenario(static: ScenarioStatic, knobs: dict) -> ScenarioBase:
    """Problem and Bayes-optimal theta_0 of one scenario (reads the sizes and the problem knobs)."""
    problem, common = _problem_and_common(static, knobs)
    return ScenarioBase(problem, common, bayes_optimal_denoiser(problem))


def unlearn_scenario(static: ScenarioStatic, base: ScenarioBase):
    """theta_u and the erased directions ``(m, angle_slots)`` (NaN-padded past ``num_erased``)."""
    n = static.num_erased
    theta_u, directions = _unlearn(base.problem, base.theta_0, static.method, n)
    pad = jnp.full((static.embed_dim, static.angle_slots - n), jnp.nan)
    return theta_u, jnp.concatenate([directions, pad], axis=1)


def finish_scenario(static: ScenarioStatic, knobs: dict, base: ScenarioBase, theta_u, directions):
    """The fine-tuning distribution, moments and Hessian eigenpairs from an unlearned point: the
    method-independent end of :func:`prepare_scenario`."""
    problem, theta_0 = base.problem, base.theta_0
    extra_key = jax.random.fold_in(jax.random.PRNGKey(knobs["seed"]), _EXTRA_KEY)
    erased = _erase_mask(static, static.num_erased)
    ft = _finetune_distribution(
        static, problem, knobs, erased, directions[:, 0], extra_key, base.common
    )
    forget = DataDistribution(
        problem.embeddings,
        problem.concept_means,
        erased / jnp.sum(erased),
        jnp.zeros((), theta_0.dtype),
    )
    setup = finetune_setup(problem, ft, theta_u, theta_0)
    return ScenarioState(
        problem, theta_0, theta_u, directions, erased, ft, setup, second_moments(problem, forget)
    )


def prepare_scenario(static: ScenarioStatic, knobs: dict) -> ScenarioState:
    """Problem, theta_0, unlearning, fine-tuning moments and Hessian eigenpairs of one scenario.

    Reads only the :data:`PROBLEM_KNOBS` of ``knobs`` (traced scalars); ``lr`` is not used. The
    composition of :func:`base_scenario`, :func:`unlearn_scenario` and :func:`finish_scenario`,
    which the sweep engine jits apart so that only the unlearning compiles once per method.
    """
    base = base_scenario(static, knobs)
    theta_u, directions = unlearn_scenario(static, base)
    return finish_scenario(static, knobs, base, theta_u, directions)


def scenario_observables(static: ScenarioStatic, state: ScenarioState, lr) -> dict[str, jax.Array]:
    """Every observable of :func:`run_scenario` from a prepared scenario and a step size ``lr``.

    Under ``jax.vmap`` over ``lr`` alone, whatever does not depend on lr (the spectrum, spectral
    weights, principal angles, presence before fine-tuning) stays unbatched: computed once.
    """
    problem, theta_0, theta_u, setup = state.problem, state.theta_0, state.theta_u, state.setup
    directions, ft = state.directions, state.finetune
    steps = jnp.asarray(static.steps)
    sched = problem.schedule
    if static.optimizer == "gd_closed_form":
        thetas = gd_closed_form(setup, theta_u, lr, steps)  # (S, L, d, d+m)
    else:
        thetas = _simulate(static.optimizer, lr, setup.moments, sched, theta_u, static.steps)

    def forget_loss(theta):
        return diffusion_loss(theta, state.forget_moments, sched)

    def presence_of_erased_per_prompt(theta):  # (K,): column 0 is the erased concept's own prompt
        return incidental_presence_matrix(problem, theta, [0], num_samples=PRESENCE_SAMPLES)[0]

    # One sampler and classifier per group of thetas (a copy per call site made the compiled
    # program larger): theta_0 and theta_u do not depend on lr, so they stay out of its batch.
    fixed = jax.vmap(presence_of_erased_per_prompt)(jnp.stack([theta_0, theta_u]))
    moved = jax.vmap(presence_of_erased_per_prompt)(thetas)
    f_loss = jax.vmap(forget_loss)(thetas)
    recovery = (forget_loss(theta_u) - f_loss) / (forget_loss(theta_u) - forget_loss(theta_0))
    predicted = predicted_rho_closed_form(setup, lr, steps)
    if static.optimizer == "adam":  # the GD law does not cover Adam
        predicted = jnp.full_like(predicted, jnp.nan)
    valid = jnp.where(jnp.isnan(directions), 0.0, directions)
    return {
        "rho": rho_observable(thetas, theta_u, theta_0),
        "predicted_rho": predicted,
        "predicted_rho_truncated": _truncated(setup, lr, steps, static.truncation_ranks),
        "forget_loss_recovery": recovery,
        "presence": moved[:, 0],
        "presence_before": fixed[0, 0],
        "incidental_presence": jnp.stack([fixed[1], moved[-1]]),
        "curvature_along_delta": curvature_along_delta(setup.delta, setup.eigen),
        "spectral_weights": spectral_weights(setup.delta, setup.eigen),
        "hessian_eigenvalues": setup.eigen.eigenvalues,
        "lambda_max": setup.eigen.lambda_max,
        "principal_angles": _angles(
            valid, (~jnp.isnan(directions[0])).astype(valid.dtype), ft.embeddings, ft.probs
        ),
    }


def run_scenario(static: ScenarioStatic, knobs: dict) -> dict[str, jax.Array]:
    """All observables of one scenario; ``knobs`` maps each :data:`DYNAMIC_KNOBS` name to a scalar.

    Returns:
      dict with ``rho``, ``predicted_rho``, ``forget_loss_recovery``, ``presence`` (each ``(S,)``;
      presence of concept 0 under its own prompt after T fine-tuning steps), ``presence_before``
      (at theta_0), ``incidental_presence`` ``(2, K)`` (presence of concept 0 under each concept's
      prompt after unlearning and after the last fine-tuning step), ``predicted_rho_truncated``
      ``(R, S)``, ``curvature_along_delta`` and
      ``lambda_max`` (scalars), ``spectral_weights`` and ``hessian_eigenvalues`` ``(L, d + m)``,
      and ``principal_angles`` ``(angle_slots,)`` (radians; NaN past the smaller rank).
    """
    return scenario_observables(static, prepare_scenario(static, knobs), knobs["lr"])


def prepare_grid(static: ScenarioStatic, problem_knobs: dict) -> ScenarioState:
    """:func:`prepare_scenario` for P problems (vmapped): every leaf gets a leading ``(P,)`` axis.

    Args:
      problem_knobs: each :data:`PROBLEM_KNOBS` name to an array ``(P,)``.
    """
    knobs = _problem_knobs(problem_knobs)
    base = base_grid(static, knobs)
    return finish_grid(static, knobs, base, *unlearn_grid(static, base))


def _problem_knobs(problem_knobs: dict) -> dict:
    return {k: problem_knobs[k] for k in PROBLEM_KNOBS}


def base_grid(static: ScenarioStatic, problem_knobs: dict) -> ScenarioBase:
    """:func:`base_scenario` for P problems (vmapped)."""
    return jax.vmap(lambda k: base_scenario(static, k))(_problem_knobs(problem_knobs))


def unlearn_grid(static: ScenarioStatic, base: ScenarioBase):
    """:func:`unlearn_scenario` for P problems (vmapped)."""
    return jax.vmap(lambda b: unlearn_scenario(static, b))(base)


def finish_grid(static: ScenarioStatic, problem_knobs: dict, base, theta_u, directions):
    """:func:`finish_scenario` for P problems (vmapped)."""
    return jax.vmap(lambda k, b, t, d: finish_scenario(static, k, b, t, d))(
        _problem_knobs(problem_knobs), base, theta_u, directions
    )


def observe_grid(static: ScenarioStatic, states: ScenarioState, lrs) -> dict[str, jax.Array]:
    """:func:`scenario_observables` for every prepared problem (leading axis P) and every step
    size in ``lrs`` ``(R,)``: outputs with leading dims ``(P, R)``, no problem work repeated."""
    lrs = jnp.asarray(lrs)

    def one_problem(state):
        return jax.vmap(lambda lr: scenario_observables(static, state, lr))(lrs)

    return jax.vmap(one_problem)(states)


def run_grid(static: ScenarioStatic, problem_knobs: dict, lrs) -> dict[str, jax.Array]:
    """Every (problem, lr) pair of a grid, each problem prepared once (vmappable, jittable).

    The sweep engine jits the two stages apart (:func:`prepare_grid` per method and erased count,
    :func:`observe_grid` per optimizer), which compiles less and shares the prepared problems
    between optimizers; this composition is the same computation.

    Args:
      static: sizes and code choices shared by the whole grid.
      problem_knobs: each :data:`PROBLEM_KNOBS` name to an array ``(P,)``: P distinct problems.
      lrs: step sizes ``(R,)``, evaluated for every problem.

    Returns:
      the outputs of :func:`run_scenario`, each with leading dims ``(P, R)``.
    """
    return observe_grid(static, prepare_grid(static, problem_knobs), lrs)
