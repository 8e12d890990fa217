"""Stage report: concept presence before unlearning, after it, and along benign fine-tuning.

One call gives the three numbers the seed paper reports per concept (theory.md s.2) plus the
resurgence observables of s.4, as a labelled :class:`StageReport` with ``.to_xarray()``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial, reduce

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory import _checks
from theory.finetune import finetune_gd, finetune_setup, simulate_finetune
from theory.law import gd_amplification, predict_rho_truncated
from theory.observables import curvature_along_delta, forget_loss_recovery, rho, spectral_weights
from theory.presence import DEFAULT_NUM_SAMPLES, clip_score, incidental_presence_matrix
from theory.problem import DataDistribution, LinearDiffusionProblem, concept_distribution
from theory.quadratic import diffusion_loss, second_moments
from theory.unlearning import get_method, resolve_concepts, unlearn_with

__all__ = ["StageReport", "stage_report", "OPTIMIZERS", "FINETUNE_PARAMS"]

OPTIMIZERS = ("gd", "adam")
FINETUNE_PARAMS = ("all", "v_only")
# Adam's default step when none is given (GD defaults to 1 / lambda_max of the fine-tuning Hessian).
_ADAM_DEFAULT_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class StageReport:
    """Presence and resurgence observables of one unlearn-then-fine-tune run.

    Stages are ``pretrained`` (theta_0), ``unlearned`` (theta_u) and ``finetuned@T`` for each T in
    ``finetune_steps``; ``stage_steps`` is -1, 0, T... Dimensionless probabilities throughout.

    Attributes:
      method, forget, retain, optimizer, finetune_params, lr, guidance_scale: the run's settings.
      finetune_probs: probability of each prompt of the fine-tuning set ``(J,)``.
      finetune_steps: ``(S,)``.
      stage_labels, stage_steps: ``(S + 2,)``.
      presence: presence of each erased concept under its own prompt, ``(stage, F)``.
      clip_score: E cos(sample, A c_f) under the erased prompt, ``(stage, F)``.
      self_presence: presence of concept k under prompt k for all K, ``(stage, K)``.
      incidental_presence: presence of erased f under prompt k, ``(stage, F, K)``.
      forget_loss: exact diffusion loss on the erased concepts' data, ``(stage,)``.
      rho, predicted_rho, forget_loss_recovery, finetune_loss: ``(S,)``; ``predicted_rho`` is
        the full-batch GD law at ``lr`` (NaN when lr >= 2 / lambda_max).
      curvature_along_delta: scalar; spectral_weights: ``(L, n)`` over the Hessian eigenspaces.
      theta_u: the unlearned parameters ``(L, d, d + m)``.
    """

    method: str
    forget: tuple
    retain: tuple
    optimizer: str
    finetune_params: str
    lr: float
    guidance_scale: float
    finetune_probs: np.ndarray
    finetune_steps: np.ndarray
    stage_labels: tuple
    stage_steps: np.ndarray
    presence: np.ndarray
    clip_score: np.ndarray
    self_presence: np.ndarray
    incidental_presence: np.ndarray
    forget_loss: np.ndarray
    rho: np.ndarray
    predicted_rho: np.ndarray
    forget_loss_recovery: np.ndarray
    finetune_loss: np.ndarray
    curvature_along_delta: float
    spectral_weights: np.ndarray
    theta_u: np.ndarray

    def to_xarray(self):
        """An ``xarray.Dataset`` with dims stage, forget, concept, step, level, eigen."""
        import xarray as xr

        k = self.self_presence.shape[1]
        coords = {
            "stage": list(self.stage_labels),
            "stage_steps": ("stage", self.stage_steps),
            "forget": list(self.forget),
            "concept": list(range(k)),
            "step": self.finetune_steps,
        }
        data = {
            "presence": (("stage", "forget"), self.presence),
            "clip_score": (("stage", "forget"), self.clip_score),
            "self_presence": (("stage", "concept"), self.self_presence),
            "incidental_presence": (("stage", "forget", "concept"), self.incidental_presence),
            "forget_loss": (("stage",), self.forget_loss),
            "rho": (("step",), self.rho),
            "predicted_rho": (("step",), self.predicted_rho),
            "forget_loss_recovery": (("step",), self.forget_loss_recovery),
            "finetune_loss": (("step",), self.finetune_loss),
            "curvature_along_delta": ((), self.curvature_along_delta),
            "spectral_weights": (("level", "eigen"), self.spectral_weights),
            "finetune_probs": (("prompt",), self.finetune_probs),
        }
        attrs = {
            "method": self.method,
            "optimizer": self.optimizer,
            "finetune_params": self.finetune_params,
            "lr": self.lr,
            "guidance_scale": self.guidance_scale,
            "retain": ",".join(map(str, self.retain)),
            "forget_concepts": ",".join(map(str, self.forget)),
        }
        return xr.Dataset(data, coords=coords, attrs=attrs)


def _finetune_data(problem, finetune, forget):
    if isinstance(finetune, DataDistribution):
        data = finetune
        emb = np.asarray(data.embeddings)
        probs = np.asarray(data.probs)
        for f in forget:
            c_f = np.asarray(problem.embeddings[:, f])
            hits = [j for j in range(emb.shape[1]) if probs[j] > 0 and np.allclose(emb[:, j], c_f)]
            if hits:
                warnings.warn(
                    f"the fine-tuning set contains the erased concept {f} (prompts {hits}): this is not "
                    "benign fine-tuning, resurgence is then expected.",
                    stacklevel=3,
                )
        return data
    probs = np.asarray(finetune, dtype=float)
    data = concept_distribution(problem, probs)
    inside = [f for f in forget if probs[f] > 0]
    if inside:
        warnings.warn(
            f"the fine-tuning set gives probability {[float(probs[f]) for f in inside]} to erased "
            f"concept(s) {inside}: this is not benign fine-tuning, resurgence is then expected.",
            stacklevel=3,
        )
    return data


def _v_only_gd(problem, moments, theta_u, delta, grad, lr, steps):
    """Exact GD on the V block only: Hessian 2 w_t S_t[d:, d:] per level. Returns (theta_T, law)."""
    d = problem.dim
    lam, vecs = jnp.linalg.eigh(2.0 * problem.schedule.weights[:, None, None] * moments[:, d:, d:])
    g = grad[..., d:] @ vecs  # (L, d, m)
    amp = gd_amplification(lam, lr, steps)  # (S, L, m)
    moved_v = (-amp[:, :, None, :] * g[None]) @ jnp.swapaxes(vecs, -1, -2)
    moved_w = jnp.zeros(moved_v.shape[:-1] + (d,), moved_v.dtype)
    theta_t = theta_u[None] + jnp.concatenate([moved_w, moved_v], axis=-1)
    dc = delta[..., d:] @ vecs
    lam_b = jnp.broadcast_to(lam[:, None, :], g.shape)
    law = predict_rho_truncated(
        lam_b.reshape(-1),
        g.reshape(-1),
        dc.reshape(-1),
        lr,
        steps,
        delta_norm_sq=jnp.sum(delta**2),
        grad_perp_dot_delta=0.0,
        lambda_perp=0.0,
    )
    return theta_t, law, lam


def _masked(transform: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """``transform`` followed by zeroing the updates outside ``mask`` (one array, entrywise)."""
    zero_outside = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (updates * mask, state),
    )
    return optax.chain(transform, zero_outside)


@partial(jax.jit, static_argnames=("num_samples",))
def _stage_presence(problem, thetas, key, guidance_scale, forget, num_samples):
    """(K x K presence matrix, CLIP-like score of each erased concept ``forget`` ``(F,)``) per stage."""
    concepts = tuple(range(problem.num_concepts))

    def one(theta):
        matrix = incidental_presence_matrix(
            problem,
            theta,
            concepts,
            guidance_scale=guidance_scale,
            key=key,
            num_samples=num_samples,
        )
        clip = jax.vmap(
            lambda f: clip_score(
                problem,
                theta,
                problem.embeddings[:, f],
                f,
                guidance_scale=guidance_scale,
                key=key,
                num_samples=num_samples,
            )
        )(forget)
        return matrix, clip

    return jax.vmap(one)(thetas)


def stage_report(
    problem: LinearDiffusionProblem,
    theta_0,
    method,
    forget,
    finetune,
    *,
    lr: float | None = None,
    steps=(0, 10, 100, 1000),
    optimizer: str = "gd",
    finetune_params: str = "all",
    retain=None,
    method_options: dict | None = None,
    guidance_scale: float = 1.0,
    key: jax.Array | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
) -> StageReport:
    """Unlearn ``forget`` with ``method``, fine-tune benignly, and report presence at every stage.

    Args:
      problem, theta_0: generator and pretrained parameters ``(L, d, d+m)``.
      method: preset name or :class:`theory.unlearning.UnlearningMethod`.
      forget: concept index or indices.
      finetune: probabilities over the K concepts ``(K,)`` (in-distribution data), or any
        :class:`DataDistribution` (e.g. new concepts).
      lr: fine-tuning step size; default 1 / lambda_max (GD) or 1e-3 (Adam).
      steps: fine-tuning step counts T to report (integers >= 0).
      optimizer: ``"gd"`` (exact closed form) or ``"adam"`` (optax simulation, full batch).
      finetune_params: ``"all"`` or ``"v_only"`` (only V is fine-tuned).
      retain: retain concepts for the unlearning method (None = all non-erased concepts).
      method_options: keyword overrides for the method (see :func:`theory.unlearning.unlearn`).
      guidance_scale: classifier-free guidance scale for sampling.
      key, num_samples: Monte-Carlo presence settings (fixed key: ``PRNGKey(0)`` by default).

    Returns:
      :class:`StageReport`.

    Raises:
      ValueError: unknown optimizer / finetune_params, bad steps, GD lr outside (0, 2/lambda_max),
        and every error of :func:`theory.unlearning.unlearn`.

    Warns:
      UserWarning: the fine-tuning set contains an erased concept (not benign).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}; got {optimizer!r}.")
    if finetune_params not in FINETUNE_PARAMS:
        raise ValueError(
            f"`finetune_params` must be one of {FINETUNE_PARAMS}; got {finetune_params!r}."
        )
    steps_np = _checks.step_counts("steps", steps)
    key = jax.random.PRNGKey(0) if key is None else key
    the_method = get_method(method, **(method_options or {}))
    forget_t, retain_t = resolve_concepts(problem, forget, retain)
    data = _finetune_data(problem, finetune, forget_t)
    theta_u, _ = unlearn_with(problem, theta_0, the_method, forget_t, retain_t)
    setup = finetune_setup(problem, data, theta_u, theta_0)
    steps_j = jnp.asarray(steps_np)
    d = problem.dim
    v_mask = jnp.zeros_like(theta_0).at[..., d:].set(1.0)

    if finetune_params == "all":
        lam_max = float(setup.eigen.lambda_max)
    else:
        lam_max = float(
            jnp.max(
                jnp.linalg.eigvalsh(
                    2.0 * problem.schedule.weights[:, None, None] * setup.moments[:, d:, d:]
                )
            )
        )
    if lr is None:
        lr = 1.0 / lam_max if optimizer == "gd" else _ADAM_DEFAULT_LR
    lr = _checks.finite_float("lr", lr, low=0.0, low_open=True)
    law_ok = lr < 2.0 / lam_max

    if finetune_params == "all":
        if optimizer == "gd":
            result = finetune_gd(problem, data, theta_u, theta_0, lr, steps_np)
            thetas, law = result.params, result.rho
        else:
            law = finetune_gd(problem, data, theta_u, theta_0, lr, steps_np).rho if law_ok else None
    else:
        thetas_v, law, _ = _v_only_gd(
            problem, setup.moments, theta_u, setup.delta, setup.grad, lr, steps_j
        )
        if optimizer == "gd":
            if not law_ok:
                raise ValueError(f"`lr` must be in (0, {2.0 / lam_max:.6g}) for GD; got {lr}.")
            thetas = thetas_v
    if optimizer == "adam":
        transform = optax.adam(lr) if finetune_params == "all" else _masked(optax.adam(lr), v_mask)
        max_steps = int(steps_np.max())
        every = reduce(math.gcd, [int(s) for s in steps_np if s > 0], 0) or 1
        if max_steps == 0:
            thetas = jnp.broadcast_to(theta_u, (steps_np.size,) + theta_u.shape)
        else:
            traj = simulate_finetune(
                problem,
                data,
                theta_u,
                theta_0,
                transform,
                max_steps,
                record_every=every,
                keep_params=True,
            )
            thetas = traj.params[steps_np // every]
    law = jnp.full(steps_np.shape, jnp.nan) if (law is None or not law_ok) else law

    forget_data = concept_distribution(
        problem, np.isin(np.arange(problem.num_concepts), forget_t) / len(forget_t)
    )
    sched = problem.schedule
    f_moments = second_moments(problem, forget_data)
    stage_thetas = jnp.concatenate([theta_0[None], theta_u[None], thetas])
    losses = jax.vmap(lambda t: diffusion_loss(t, f_moments, sched))(stage_thetas)
    ft_loss = jax.vmap(lambda t: diffusion_loss(t, setup.moments, sched))(thetas)
    matrices, clip = _stage_presence(
        problem, stage_thetas, key, guidance_scale, jnp.asarray(forget_t), num_samples
    )
    forget_idx = np.asarray(forget_t)
    self_presence = jnp.diagonal(matrices, axis1=-2, axis2=-1)
    labels = ("pretrained", "unlearned") + tuple(f"finetuned@{int(s)}" for s in steps_np)
    f = lambda x: np.asarray(x, dtype=float)  # noqa: E731
    return StageReport(
        method=the_method.name,
        forget=forget_t,
        retain=retain_t,
        optimizer=optimizer,
        finetune_params=finetune_params,
        lr=float(lr),
        guidance_scale=float(guidance_scale),
        finetune_probs=f(data.probs),
        finetune_steps=steps_np.astype(np.int64),
        stage_labels=labels,
        stage_steps=np.concatenate([[-1, 0], steps_np]).astype(np.int64),
        presence=f(self_presence[:, forget_idx]),
        clip_score=f(clip),
        self_presence=f(self_presence),
        incidental_presence=f(matrices[:, forget_idx, :]),
        forget_loss=f(losses),
        rho=f(rho(thetas, theta_u, theta_0)),
        predicted_rho=f(law),
        forget_loss_recovery=f(forget_loss_recovery(losses[2:], losses[1], losses[0])),
        finetune_loss=f(ft_loss),
        curvature_along_delta=float(curvature_along_delta(setup.delta, setup.eigen)),
        spectral_weights=f(spectral_weights(setup.delta, setup.eigen)),
        theta_u=f(theta_u),
    )
