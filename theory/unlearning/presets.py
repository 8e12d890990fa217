r"""Named unlearning methods as short compositions, and :func:`unlearn` (theory.md s.3).

Each preset mirrors a published method; its docstring says what the linear version keeps and
drops. The linear model has one "layer" per noise level, theta_t = [W_t, V_t]: V_t plays the
cross-attention K/V projections, W_t the rest of the UNet. All data terms use in-distribution
samples of the concept (x_0 ~ N(A c, Sigma)), not the model's own generations.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import optax

from theory.problem import LinearDiffusionProblem
from theory.unlearning import masks, solvers, targets
from theory.unlearning.compose import UnlearningMethod, compose, unlearn_with

__all__ = [
    "uce",
    "mace",
    "esd_x",
    "esd_u",
    "sdd",
    "salun",
    "scissorhands",
    "erasediff",
    "PRESETS",
    "METHOD_NAMES",
    "get_method",
    "unlearn",
]


def uce(*, anchor=None, retain_weight=1.0, proximity=0.1) -> UnlearningMethod:
    r"""UCE (Gandikota et al. 2024): closed-form edit of the cross-attention projections.

    Per level, V' = (lambda V0 + sum_e V0 c_a c_e^T + beta sum_p V0 c_p c_p^T)
    (lambda I + sum_e c_e c_e^T + beta sum_p c_p c_p^T)^{-1}: exactly the published formula
    (beta = 1). Keeps: the objective and its closed form, mass erasure, the preserve set (default:
    every non-erased concept). Drops: nothing of the edit itself; the published anchor for styles
    is the empty prompt, the default here (``anchor=None``).

    >>> uce().solver.name, uce().mask.name
    ('closed_form', 'v_only')
    """
    return compose(
        targets.anchor(anchor),
        masks.v_only(),
        solvers.closed_form(),
        retain_weight=retain_weight,
        proximity=proximity,
        name="uce",
    )


def mace(*, retain_weight=1.0, proximity=0.01) -> UnlearningMethod:
    r"""MACE (Lu et al. 2024): mass concept erasure by a closed-form cross-attention refinement.

    Keeps: MACE's closed-form refinement of K/V, min sum_e ||V c_e - V0 c_e^g||^2 +
    beta sum_p ||V c_p - V0 c_p||^2 + lambda ||V - V0||^2, for many concepts at once, with the
    mapping target c_e^g = c_e projected on the span of the preserved prompts (the embedding of
    the prompt "without the concept words"). Drops: the per-concept LoRA modules, their fusion and
    the attention-map loss (no attention in the linear model).
    """
    return compose(
        targets.anchor("retain_projection"),
        masks.v_only(),
        solvers.closed_form(),
        retain_weight=retain_weight,
        proximity=proximity,
        name="mace",
    )


def esd_x(*, guidance=1.0, steps=300, learning_rate=1e-3) -> UnlearningMethod:
    r"""ESD-x (Gandikota et al. 2023): distil negative guidance into the cross-attention.

    Target eps_0(x,0) - g (eps_0(x,c_f) - eps_0(x,0)); only V moves; Adam for a fixed number of
    steps and no retain term, as published; Adam's per-coordinate scaling moves V off the c_f
    direction, so other prompts change too (with SGD and orthogonal embeddings they would not). Drops: x_t from the model's own partial generations
    (here x_t comes from the concept's data) and the stochastic single-timestep updates (here full
    expectation over all levels per step).
    """
    return compose(
        targets.negative_guidance(guidance),
        masks.v_only(),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=0.0,
        name="esd_x",
    )


def esd_u(*, guidance=1.0, steps=300, learning_rate=2e-3) -> UnlearningMethod:
    r"""ESD-u: as :func:`esd_x` but every parameter moves (published: all non-cross-attention
    layers; here W and V, since the linear model has no separate third block)."""
    return compose(
        targets.negative_guidance(guidance),
        masks.all_params(),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=0.0,
        name="esd_u",
    )


def sdd(*, steps=300, learning_rate=3e-3, retain_weight=0.0) -> UnlearningMethod:
    r"""SDD (Kim et al. 2023): self-distillation of the conditional output onto the unconditional one.

    Target eps_0(x, 0) for the forget prompt; Adam for a fixed number of steps; every parameter
    moves (our choice; override with ``mask=``). Drops: the EMA teacher and the model's own
    generations as x_t (here the frozen theta_0 is the teacher and x_t is concept data).
    """
    return compose(
        targets.null(),
        masks.all_params(),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=retain_weight,
        name="sdd",
    )


def salun(
    *, q=0.5, anchor="first_retained", steps=300, learning_rate=1e-2, retain_weight=1.0
) -> UnlearningMethod:
    r"""SalUn (Fan et al. 2024): random relabelling restricted to salient weights, plus retain loss.

    Keeps: the saliency mask (top-q of |grad L_forget| at theta_0, L_forget being the relabelling
    objective's forget term), the relabelling target eps_0(x, c') with c' != c_f, the retain
    term, finite Adam steps. Drops: the random choice of c' per sample (a fixed other concept here,
    the first retained one by default).
    """
    return compose(
        targets.anchor(anchor),
        masks.saliency(q),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=retain_weight,
        name="salun",
    )


def scissorhands(*, q=0.1, steps=300, learning_rate=1e-2, retain_weight=1.0) -> UnlearningMethod:
    r"""Scissorhands / SHS (Wu & Harandi 2024): trim the most forget-sensitive weights, then repair.

    Keeps: connection sensitivity |theta_0 * grad L_forget| (SNIP), reset of its top-q entries to
    zero, repair of only those entries on retain data (with the null target on the forget prompt
    so the repair does not simply re-learn the concept), finite Adam steps. Drops: the gradient
    projection of the repair step onto the complement of the forget-gradient subspace.
    """
    return compose(
        targets.null(),
        masks.reset_repair(q),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=retain_weight,
        name="scissorhands",
    )


def erasediff(
    *, anchor="first_retained", steps=100, learning_rate=1e-2, retain_weight=10.0
) -> UnlearningMethod:
    r"""EraseDiff (Wu et al. 2024, arXiv 2401.05779): a bi-level forget/retain objective, first order.

    Keeps: the forget term of the authors' Stable Diffusion code (github.com/JingWu321/EraseDiff,
    ``train-scripts``): on noisy images of the erased concept, the prediction for the erased prompt
    is matched to the model's prediction for a pseudo prompt naming something else on the same
    noisy image (here eps_0(x_t, c_a) with c_a the first retained concept); the standard loss on
    retain data; every parameter; finite Adam steps. The first-order bi-level update
    (BOME: grad L_retain + lambda_bome grad(L_forget - L_forget^*), lambda_bome = 0.1 there) has the
    gradient of L_forget + L_retain / lambda_bome, hence ``retain_weight`` = 10. Drops: the inner
    K-step estimate of L_forget^* (a constant in the gradient), stochastic minibatches, and the
    pseudo-prompt output taken from the current rather than the frozen model.

    The class-conditional variant of the paper matches eps_f ~ U(0, I) instead
    (``target=noise_matching()``); in the linear model that target sends the erased prompt's samples
    to an arbitrary region, which the Bayes classifier assigns to the erased concept itself for some
    problems (presence 1.0 and 0.975 after unlearning for 2 of 6 random problems), so it is not the
    default. Both objectives are bounded quadratics: unlike gradient ascent on the forget loss
    (stationary with a saddle at a Bayes-optimal theta_0), the Adam run does not amplify round-off.

    >>> erasediff().target.name, erasediff().mask.name
    ('anchor', 'all')
    """
    return compose(
        targets.anchor(anchor),
        masks.all_params(),
        solvers.optax_solver(optax.adam(learning_rate), steps),
        retain_weight=retain_weight,
        name="erasediff",
    )


PRESETS: dict[str, Callable[..., UnlearningMethod]] = {
    "uce": uce,
    "esd_x": esd_x,
    "esd_u": esd_u,
    "sdd": sdd,
    "salun": salun,
    "scissorhands": scissorhands,
    "erasediff": erasediff,
    "mace": mace,
}
METHOD_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_method(method, **overrides) -> UnlearningMethod:
    """A preset by name (``overrides`` are its keyword arguments) or a method with fields replaced.

    Fields ``target``, ``mask``, ``solver`` may be given as registry names.

    Raises:
      ValueError: unknown method name or override (the message lists the valid ones).
    """
    if isinstance(method, str):
        if method not in PRESETS:
            raise ValueError(
                f"unknown unlearning method {method!r}; valid methods: {', '.join(METHOD_NAMES)}."
            )
        factory = PRESETS[method]
        allowed = tuple(inspect.signature(factory).parameters)
        parts = {k: overrides.pop(k) for k in ("target", "mask", "solver") if k in overrides}
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {method!r}; valid: {', '.join(allowed)}, target, mask, solver."
            )
        return get_method(factory(**overrides), **parts) if parts else factory(**overrides)
    if not isinstance(method, UnlearningMethod):
        raise ValueError(
            f"`method` must be a preset name ({', '.join(METHOD_NAMES)}) or an UnlearningMethod; got {method!r}."
        )
    fields = tuple(f.name for f in dataclasses.fields(UnlearningMethod))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for an UnlearningMethod; valid: {', '.join(fields)}."
        )
    parts = {k: v for k, v in overrides.items() if k in ("target", "mask", "solver")}
    rest = {k: v for k, v in overrides.items() if k not in parts}
    composed = compose(
        parts.get("target", method.target),
        parts.get("mask", method.mask),
        parts.get("solver", method.solver),
        retain_weight=rest.get("retain_weight", method.retain_weight),
        proximity=rest.get("proximity", method.proximity),
        name=rest.get("name", method.name),
    )
    return composed


def unlearn(problem: LinearDiffusionProblem, theta_0, method, forget, *, retain=None, **overrides):
    r"""Erase concept(s) ``forget`` from theta_0 with ``method``; returns theta_u ``(L, d, d+m)``.

    Args:
      problem: the generator (defines the concept data and embeddings).
      theta_0: pretrained parameters ``(L, d, d+m)``.
      method: a name in :data:`METHOD_NAMES` or an :class:`UnlearningMethod`.
      forget: a concept index or a sequence of them (mass erasure).
      retain: concept indices to preserve; None = every non-erased concept; ``()`` = none.
      **overrides: the preset's keyword arguments (e.g. ``proximity=0.5``, ``q=0.2``), or, for an
        UnlearningMethod, its fields; ``target``/``mask``/``solver`` accept registry names.

    Raises:
      ValueError: unknown method/part/option names (listing valid ones), bad concept indices, an
        anchor equal to a forget concept, q outside (0, 1], an empty retain set where the method
        needs one, or an unbounded closed-form objective.

    >>> import jax
    >>> from theory import make_problem, concept_distribution, pretrain_closed_form
    >>> p = make_problem(jax.random.PRNGKey(0), dim=4, embed_dim=4, num_concepts=3, num_levels=2)
    >>> t0 = pretrain_closed_form(p, concept_distribution(p, [1/3] * 3))
    >>> unlearn(p, t0, "uce", 0).shape
    (2, 4, 8)
    """
    return unlearn_with(problem, theta_0, get_method(method, **overrides), forget, retain)[0]
