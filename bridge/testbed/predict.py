"""Predicted and measured readouts of one unlearning method on the testbed (the bridge pipeline).

For one unlearned UNet: probes (:mod:`bridge.probes`: the fine-tuning quadrature, the demo's
forget batches, the presence seeds of :meth:`bridge.testbed.stages.Stages.presence_hook`) ->
readout gradients (:mod:`bridge.readouts`) -> one curvature measurement per local model
(:mod:`bridge.local_curvature`): the Hessian (both spectrum ends + closure, and one Lanczos run
at g) and the generalised Gauss-Newton matrix of the linearised network (:mod:`bridge.ggn`, one
Lanczos run at g) -> predictions for every lr x T (:mod:`bridge.predict`, no product): the law's
first-order Delta R, and every readout evaluated at theta_u + Delta theta_pred(T) (the UNet
generates there: predicted presence) -> measured GD on the same loss, group and seeds
(:func:`bridge.measure.measure_gd`). The result is one JSON-able record.

Why two local models: at a UNet's theta_u the Hessian has negative eigenvalues, along which GD
on the second-order model grows like (1 + lr |lambda|)^T while real GD levels off; the
linearised network's quadratic (Hessian G, positive semi-definite) has no such direction. In
the linear model of theory.md the two coincide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from bridge.curvature import HessianOperator
from bridge.ggn import GGNOperator
from bridge.hygiene import check_group_covers_edit, method_group
from bridge.local_curvature import measure_local_curvature
from bridge.loss import FrozenDiffusionLoss, ProbeBatch
from bridge.measure import measure_gd
from bridge.predict import check_same_seeds, predict_at_points, predict_readouts
from bridge.probes import Probes, finetune_probes, sampler_probe
from bridge.readouts import ReadoutSet
from bridge.subspaces import spectral_weights

__all__ = [
    "PRESENCE_SEED_BASE",
    "classifier_log_probs",
    "predict_and_measure",
    "presence_seeds",
    "step_grid",
]

#: First x_T seed of the demo's presence images (the hook of ``Stages.presence_hook``).
PRESENCE_SEED_BASE = 10_000


def step_grid(gd_steps: int) -> list[int]:
    """The step counts at which predictions and measurements are compared: 0, T/4, ..., T.

    >>> step_grid(40)
    [0, 10, 20, 30, 40]
    """
    return [gd_steps * k // 4 for k in range(5)]


def presence_seeds(count: int) -> list[int]:
    """The demo's presence seeds: ``count`` consecutive seeds from :data:`PRESENCE_SEED_BASE`."""
    return list(range(PRESENCE_SEED_BASE, PRESENCE_SEED_BASE + count))


def classifier_log_probs(classifier):
    """Differentiable ``images -> (n, K)`` log-probabilities of the testbed classifier.

    The same input handling as ``ConceptClassifier.probabilities`` (float32, clamped to
    [-1, 1]), without its ``no_grad``.
    """

    def log_probs(images: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(classifier(images.float().clamp(-1, 1)), dim=-1)

    return log_probs


def _group_spec(spec: str, method: str) -> str:
    return method_group(method) if spec == "method" else spec


def predict_and_measure(
    base,
    unlearned,
    text_encoder,
    scheduler,
    classifier,
    *,
    method: str,
    erase: str,
    concept: int,
    captions: Sequence[str],
    images: torch.Tensor,
    forget_batches: Sequence[ProbeBatch],
    group: str = "cross-attn",
    lr_fractions: Sequence[float],
    steps: Sequence[int],
    top_k: int,
    probe_batch: int,
    seeds: Sequence[int],
    sample_steps: int,
    guidance_scale: float,
    seed: int = 0,
    curvature: Literal["ggn", "hessian"] = "ggn",
    progress: bool = False,
) -> dict[str, Any]:
    """Every readout predicted (Krylov, closure) and measured, for every lr x T; JSON-able.

    Args:
      base, unlearned: UNets at theta_0, theta_u. text_encoder, scheduler: the pipeline's.
      classifier: the testbed's :class:`~bridge.testbed.classifier.ConceptClassifier`.
      method: the unlearning method (messages; ``group="method"`` takes its own group).
      erase: the erased prompt. concept: its class index.
      captions, images: the fine-tuning set. forget_batches: the erased concept's probes.
      group: fine-tuned and measured group (a preset, a regex or ``"method"``); it must cover
        every tensor the method edited.
      lr_fractions: GD step sizes as fractions of 2 / lambda_max (measured at theta_u).
      steps: GD step counts T (the Krylov run has max(steps) Lanczos steps: exact for all).
      top_k: eigenpairs per spectrum end (closure predictor). probe_batch: samples per batch.
      seeds, sample_steps, guidance_scale: presence sampling (as the demo's presence hook).
      seed: seed of the fine-tuning quadrature and the Lanczos start.
      curvature: the local quadratic model of the headline prediction: ``"ggn"`` (the
        linearised network, :mod:`bridge.ggn`) or ``"hessian"`` (the second-order Taylor model;
        it grows geometrically along the Hessian's negative directions).
      progress: progress bars.

    Returns:
      dict with ``lrs``, ``steps``, ``readouts``; ``predicted`` (readout -> ``(lr, step)``): every
      readout evaluated at theta_u + Delta theta_pred(T), Delta theta from the Krylov run of
      ``curvature`` (``predicted_presence``: presence generated there); ``alternatives``: the
      other predictors (first-order law by Krylov and by eigenpairs + closure, the other
      curvature at points); ``measured`` (readout -> ``(lr, step)``) of actual GD; the spectrum,
      product counts and timings.
    """
    group_ = check_group_covers_edit(base, unlearned, _group_spec(group, method), method=method)
    probes = Probes(
        finetune=finetune_probes(
            text_encoder,
            captions,
            images,
            alphas_cumprod=scheduler.alphas_cumprod,
            batch_size=probe_batch,
            seed=seed,
        ),
        forget=list(forget_batches),
        sampler=sampler_probe(
            text_encoder,
            erase,
            scheduler=scheduler,
            seeds=seeds,
            steps=sample_steps,
            guidance_scale=guidance_scale,
        ),
        seed=seed,
    )
    times: dict[str, float] = {}
    t0 = time.time()
    readouts = ReadoutSet(
        base, unlearned, group_, probes, log_probs=classifier_log_probs(classifier), concept=concept
    )
    grads = readouts.gradients()
    times["readout_gradients_s"] = time.time() - t0
    t = [int(s) for s in steps]
    loss = FrozenDiffusionLoss(unlearned, group_, probes.finetune)
    t0 = time.time()
    hess = HessianOperator(loss, progress=progress)
    curv = measure_local_curvature(hess, top_k=top_k, krylov_depth=max(t), seed=seed)
    times["hessian_curvature_s"] = time.time() - t0
    t0 = time.time()
    ggn = GGNOperator(loss, progress=progress)
    linear = measure_local_curvature(ggn, krylov_depth=max(t), seed=seed)
    times["ggn_curvature_s"] = time.time() - t0
    lrs = [float(f) * 2.0 / curv.lambda_max for f in lr_fractions]
    products = hess.num_matvecs + ggn.num_matvecs
    t0 = time.time()
    first_order = {
        "hessian_krylov_first_order": predict_readouts(curv, grads, lrs=lrs, steps=t),
        "hessian_closure_first_order": predict_readouts(
            curv, grads, lrs=lrs, steps=t, predictor="closure"
        ),
        "ggn_krylov_first_order": predict_readouts(linear, grads, lrs=lrs, steps=t),
    }
    times["prediction_grid_s"] = time.time() - t0  # every readout x lr x T: no product
    t0 = time.time()
    at_points = {
        f"{name}_at_points": predict_at_points(readouts, c, lrs=lrs, steps=t, names=grads.names)
        for name, c in (("ggn", linear), ("hessian", curv))
    }
    times["predicted_at_points_s"] = time.time() - t0
    assert hess.num_matvecs + ggn.num_matvecs == products  # predictions cost no product
    t0 = time.time()
    runs = [measure_gd(loss, readouts, lr=lr, steps=t, progress=progress) for lr in lrs]
    times["measured_gd_s"] = time.time() - t0
    for run in runs:
        check_same_seeds(first_order["ggn_krylov_first_order"].seeds, run.seeds)

    def per_readout(array):  # (N, R, S) -> {name: nested list (R, S)}
        return {n: np.asarray(array[i]).tolist() for i, n in enumerate(grads.names)}

    alternatives = {k: per_readout(p.predicted) for k, p in first_order.items()}
    alternatives.update(
        {k: {n: v.tolist() for n, v in points.items()} for k, points in at_points.items()}
    )
    primary = alternatives.pop(f"{curvature}_at_points")
    closure = first_order["hessian_closure_first_order"]
    return {
        "method": method,
        "group": group_.spec,
        "group_size": group_.numel,
        "lr_fractions": [float(f) for f in lr_fractions],
        "lrs": lrs,
        "steps": t,
        "readouts": list(grads.names),
        "values_unlearned": dict(zip(grads.names, grads.values.tolist(), strict=True)),
        "predictor": f"{curvature}_at_points",
        "predicted": primary,
        "predicted_presence": primary["presence"],
        "alternatives": alternatives,
        "closure_negative_share": per_readout(closure.negative_share),
        "measured": per_readout(np.stack([r.values for r in runs], axis=1)),
        "eigenvalues": curv.eigenvalues.tolist(),
        "eigen_converged": curv.eigen_converged,
        "lambda_perp": curv.lambda_perp,
        "ggn_ritz_values": linear.krylov.ritz()[0].tolist(),
        "spectral_weights": spectral_weights(curv.eigenvectors, readouts.delta).tolist(),
        "hvps": dict(curv.hvps),
        "ggn_products": dict(linear.hvps),
        "seeds": list(probes.sampler.seeds),
        "timings_s": {k: round(v, 3) for k, v in times.items()},
    }
