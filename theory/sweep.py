r"""One resurgence scenario as a pure, vmappable function of scalar knobs (the sweep kernel).

A scenario is: a random problem (as :func:`theory.make_problem` draws it from ``seed``), the
Bayes-optimal pretrained point theta_0, an unlearning edit erasing the first ``num_erased``
concepts, benign fine-tuning, and every observable of theory.md section 4 at the requested step
counts. All knobs in :data:`DYNAMIC_KNOBS` are traced scalars, so ``jax.vmap`` over a grid of them
compiles once; sizes and code choices live in :class:`ScenarioStatic` (a hashable jit-static arg).

Fine-tuning prompts (``finetune``):

* ``"constructed"``: one prompt c = sqrt(curvature) (cos(angle) r_hat + sin(angle) u), where
  r = M^{-1} c_f is the erased direction of the first erased concept (theory.md s.4 (c)) and u a
  random unit vector orthogonal to it: ``overlap_angle`` is then exactly the principal angle
  between r and the fine-tuning embedding subspace, and ``curvature`` scales its Hessian block.
* ``"other_concepts"``: the retained concepts, uniformly, embeddings scaled by sqrt(curvature);
  overlap with r then comes from the shared component rho_c.

Fine-tuning images come from the true generator, shifted by ``target_shift`` * B c (new concepts,
B random) and with null-prompt dropout ``p_null``; both make theta_0 sub-optimal (a drift term).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory.finetune import finetune_setup, gd_closed_form, predicted_rho_closed_form, simulate_finetune
from theory.law import predict_rho_truncated
from theory.observables import curvature_along_delta, spectral_weights
from theory.observables import rho as rho_observable
from theory.pretrain import bayes_optimal_denoiser
from theory.problem import DataDistribution, LinearDiffusionProblem, make_noise_schedule
from theory.quadratic import diffusion_loss, eigen_coordinates, join_params, second_moments, split_params

__all__ = [
    "DYNAMIC_KNOBS",
    "FINETUNE_MODES",
    "OPTIMIZERS",
    "INLINE_METHODS",
    "ScenarioStatic",
    "scenario_problem",
    "run_scenario",
]

# Traced scalar knobs (one value per configuration) and their defaults.
DYNAMIC_KNOBS: dict[str, float] = {
    "seed": 0,
    "common_component": 0.3,
    "spectrum_decay": 1.0,
    "generator_scale": 1.0,
    "num_erased": 1,
    "uce_ridge": 0.1,
    "overlap_angle": 0.5,
    "curvature": 1.0,
    "p_null": 0.0,
    "target_shift": 0.0,
    "lr": 0.5,
}
FINETUNE_MODES = ("constructed", "other_concepts")
OPTIMIZERS = ("gd_closed_form", "gd", "adam")
INLINE_METHODS = ("uce",)
_EXTRA_KEY = 7  # fold_in tag for randomness beyond make_problem's (directions, target shift)


@dataclasses.dataclass(frozen=True)
class ScenarioStatic:
    """Sizes and code choices of a scenario group (hashable: a jit static argument).

    Attributes:
      dim, embed_dim, num_concepts, num_levels: d, m, K, L.
      method: unlearning method name.
      optimizer: one of :data:`OPTIMIZERS` (``gd_closed_form`` is exact GD; ``gd`` and ``adam``
        run optax in ``lax.scan`` on the exact gradient).
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
    finetune: str = "constructed"
    steps: tuple[int, ...] = (0, 10, 100)
    truncation_ranks: tuple[int, ...] = (1, 4)


def scenario_problem(static: ScenarioStatic, knobs: dict) -> LinearDiffusionProblem:
    """The problem :func:`theory.make_problem` draws from ``PRNGKey(seed)``, with traced knobs."""
    d, m, k = static.dim, static.embed_dim, static.num_concepts
    key = jax.random.PRNGKey(knobs["seed"])
    k_basis, k_gen, k_emb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_basis, (d, d)))
    spectrum = jnp.arange(1, d + 1, dtype=q.dtype) ** (-knobs["spectrum_decay"])
    covariance = (q * spectrum) @ q.T
    covariance = 0.5 * (covariance + covariance.T)
    generator = jax.random.normal(k_gen, (d, m), dtype=q.dtype) * (knobs["generator_scale"] / np.sqrt(m))
    basis, _ = jnp.linalg.qr(jax.random.normal(k_emb, (m, k + 1)))
    rho_c = knobs["common_component"]
    embeddings = jnp.sqrt(rho_c) * basis[:, :1] + jnp.sqrt(1.0 - rho_c) * basis[:, 1:]
    return LinearDiffusionProblem(generator, covariance, embeddings, make_noise_schedule(static.num_levels))


def _erase_mask(static: ScenarioStatic, num_erased) -> jax.Array:
    return (jnp.arange(static.num_concepts) < num_erased).astype(jnp.float64)


def _inline_uce(problem, theta_0, erased, ridge):
    r"""V-only UCE with the null anchor and the other concepts retained (theory.md s.3).

    V' = V0 (lambda I + C_p C_p^T) G^{-1}, G = lambda I + C_e C_e^T + C_p C_p^T. Returns
    (theta_u, G).
    """
    c = problem.embeddings
    retained = 1.0 - erased
    eye = jnp.eye(c.shape[0], dtype=c.dtype)
    gram = ridge * eye + (c * (erased + retained)) @ c.T
    w0, v0 = split_params(theta_0, problem.dim)
    v_u = v0 @ (ridge * eye + (c * retained) @ c.T) @ jnp.linalg.inv(gram)
    return join_params(w0, v_u), gram


def _unit(x):
    return x / jnp.linalg.norm(x)


def _finetune_distribution(static, problem, knobs, erased, erased_direction, extra_key):
    k_u, k_shift = jax.random.split(extra_key)
    m = static.embed_dim
    scale = jnp.sqrt(knobs["curvature"])
    if static.finetune == "constructed":
        r_hat = _unit(erased_direction)
        u = jax.random.normal(k_u, (m,), dtype=r_hat.dtype)
        u = _unit(u - (u @ r_hat) * r_hat)
        angle = knobs["overlap_angle"]
        emb = (scale * (jnp.cos(angle) * r_hat + jnp.sin(angle) * u))[:, None]
        probs = jnp.ones((1,), emb.dtype)
    else:
        emb = scale * problem.embeddings
        retained = 1.0 - erased
        probs = retained / jnp.sum(retained)
    shift = jax.random.normal(k_shift, (static.dim, m), dtype=emb.dtype) / np.sqrt(m)
    means = (problem.generator + knobs["target_shift"] * shift) @ emb
    return DataDistribution(emb, means, probs, jnp.asarray(knobs["p_null"], emb.dtype))


def _angles(forget_basis, forget_weights, ft_embeddings, ft_probs):
    """Principal angles (ascending, radians) between span(forget columns) and span(ft prompts).

    Columns with weight 0 are excluded; angles beyond the smaller rank are NaN. Shape ``(K,)``.
    """

    def range_basis(vectors, weights):
        gram = (vectors * weights) @ vectors.T
        lam, vecs = jnp.linalg.eigh(gram)
        # Relative cut-off: exact zeros of a rank-deficient Gram matrix sit at round-off level.
        keep = lam > 1e-10 * jnp.max(lam)
        return vecs * keep, jnp.sum(keep)

    qa, ra = range_basis(forget_basis, forget_weights)
    qb, rb = range_basis(ft_embeddings, ft_probs)
    cosines = jnp.linalg.svd(qa.T @ qb, compute_uv=False)[: forget_basis.shape[1]]
    angles = jnp.arccos(jnp.clip(cosines, 0.0, 1.0))
    return jnp.where(jnp.arange(angles.shape[0]) < jnp.minimum(ra, rb), angles, jnp.nan)


def _truncated(setup, lr, steps, ranks):
    """rho_k(T) for each k: top-k eigenspaces exactly, the remainder as one closure direction."""
    lam = setup.eigen.eigenvalues  # (L, n)
    g = eigen_coordinates(setup.grad, setup.eigen)  # (L, d, n)
    dc = eigen_coordinates(setup.delta, setup.eigen)
    order = jnp.argsort(-lam.reshape(-1))
    rank_of = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0])).reshape(lam.shape)
    lam_full = jnp.broadcast_to(lam[:, None, :], g.shape)
    out = []
    for k in ranks:
        top = jnp.broadcast_to((rank_of < k)[:, None, :], g.shape)
        g_perp_sq = jnp.sum(jnp.where(top, 0.0, g**2))
        safe = jnp.where(g_perp_sq > 0, g_perp_sq, 1.0)
        lambda_perp = jnp.where(g_perp_sq > 0, jnp.sum(jnp.where(top, 0.0, lam_full * g**2)) / safe, 0.0)
        out.append(
            predict_rho_truncated(
                lam_full.reshape(-1),
                jnp.where(top, g, 0.0).reshape(-1),
                dc.reshape(-1),
                lr,
                steps,
                delta_norm_sq=jnp.sum(dc**2),
                grad_perp_dot_delta=jnp.sum(jnp.where(top, 0.0, g * dc)),
                lambda_perp=lambda_perp,
            )
        )
    return jnp.stack(out)


def _unlearn(static, problem, theta_0, knobs, erased):
    """theta_u and the erased embedding directions r_e = M^{-1} c_e (columns, shape (m, K))."""
    if static.method not in INLINE_METHODS:
        raise ValueError(f"`method` must be one of {INLINE_METHODS}; got {static.method!r}.")
    theta_u, gram = _inline_uce(problem, theta_0, erased, knobs["uce_ridge"])
    return theta_u, jnp.linalg.solve(gram, problem.embeddings)


def run_scenario(static: ScenarioStatic, knobs: dict) -> dict[str, jax.Array]:
    """All observables of one scenario. ``knobs`` maps every name in :data:`DYNAMIC_KNOBS` to a scalar.

    Returns:
      dict with ``rho``, ``predicted_rho``, ``forget_loss_recovery`` (each ``(S,)``),
      ``predicted_rho_truncated`` ``(R, S)``, ``curvature_along_delta`` and ``lambda_max``
      (scalars), ``spectral_weights`` and ``hessian_eigenvalues`` ``(L, d + m)``, and
      ``principal_angles`` ``(K,)`` (radians; NaN past the smaller rank).
    """
    problem = scenario_problem(static, knobs)
    extra_key = jax.random.fold_in(jax.random.PRNGKey(knobs["seed"]), _EXTRA_KEY)
    theta_0 = bayes_optimal_denoiser(problem)
    erased = _erase_mask(static, knobs["num_erased"])
    theta_u, directions = _unlearn(static, problem, theta_0, knobs, erased)
    ft = _finetune_distribution(static, problem, knobs, erased, directions[:, 0], extra_key)
    forget = DataDistribution(
        problem.embeddings, problem.concept_means, erased / jnp.sum(erased), jnp.zeros((), theta_0.dtype)
    )
    setup = finetune_setup(problem, ft, theta_u, theta_0)
    steps = jnp.asarray(static.steps)
    lr = knobs["lr"]
    forget_moments = second_moments(problem, forget)
    sched = problem.schedule

    def forget_loss(theta):
        return diffusion_loss(theta, forget_moments, sched)

    if static.optimizer == "gd_closed_form":
        thetas = gd_closed_form(setup, theta_u, lr, steps)
        rho = rho_observable(thetas, theta_u, theta_0)
        f_loss = jax.vmap(forget_loss)(thetas)
    else:
        opt = optax.sgd(lr) if static.optimizer == "gd" else optax.adam(lr)
        traj = simulate_finetune(problem, ft, theta_u, theta_0, opt, max(max(static.steps), 1), forget=forget)
        rho, f_loss = traj.rho[steps], traj.forget_loss[steps]
    recovery = (forget_loss(theta_u) - f_loss) / (forget_loss(theta_u) - forget_loss(theta_0))
    predicted = predicted_rho_closed_form(setup, lr, steps)
    if static.optimizer == "adam":
        predicted = jnp.full_like(predicted, jnp.nan)  # the GD law does not cover Adam
    return {
        "rho": rho,
        "predicted_rho": predicted,
        "predicted_rho_truncated": _truncated(setup, lr, steps, static.truncation_ranks),
        "forget_loss_recovery": recovery,
        "curvature_along_delta": curvature_along_delta(setup.delta, setup.eigen),
        "spectral_weights": spectral_weights(setup.delta, setup.eigen),
        "hessian_eigenvalues": setup.eigen.eigenvalues,
        "lambda_max": setup.eigen.lambda_max,
        "principal_angles": _angles(directions, erased, ft.embeddings, ft.probs),
    }
