"""Predicted rho for several learning rates from one curvature measurement (testbed adapter).

:func:`bridge.measure.measure_resurgence` takes one learning rate per call and recomputes the
Lanczos eigenpairs each time. The resurgence law needs the eigenpairs once and is cheap per
learning rate, so this adapter builds the *same* frozen fine-tuning loss as ``measure_resurgence``
(same probe-batch construction and seeds), measures both spectrum ends once with
:mod:`bridge.curvature`, and evaluates the law (:func:`bridge.subspaces.predicted_rho`, i.e.
``theory.law``) for every learning rate. It returns the probe batches, so the measured GD run
fine-tunes on exactly the loss the prediction is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from bridge.curvature import HessianOperator, curvature_along, spectrum_ends
from bridge.groups import select_group
from bridge.loss import FrozenDiffusionLoss, ProbeBatch, make_probe_batches
from bridge.subspaces import forget_displacement, predicted_rho, spectral_weights

__all__ = ["LrPrediction", "finetune_probe_batches", "predict_rho_over_lrs"]


class LrPrediction(NamedTuple):
    """Predictions over learning rates: ``predicted_rho`` ``(lr, step)``; spectrum ``(eigen,)``."""

    lrs: np.ndarray
    steps: np.ndarray
    predicted_rho: np.ndarray
    negative_dominated: np.ndarray
    eigenvalues: np.ndarray
    spectral_weights: np.ndarray
    curvature_along_delta: float
    num_hvps: int


def finetune_probe_batches(text_encoder, prompts, images, alphas_cumprod, *, batch_size, seed):
    """The fine-tuning quadrature exactly as ``measure_resurgence`` draws it (seed + 1)."""
    cond = text_encoder.encode_prompts(list(prompts))
    return make_probe_batches(images, cond, alphas_cumprod, batch_size=batch_size, seed=seed + 1)


def predict_rho_over_lrs(
    base,
    unlearned,
    batches: Sequence[ProbeBatch],
    *,
    lrs: Sequence[float] | None = None,
    lr_fractions: Sequence[float] | None = None,
    steps: Sequence[int],
    top_k: int = 8,
    params: str = "cross-attn-kv",
    seed: int = 0,
    tol: float = 1e-4,
    hvp_method: str = "double-backward",
) -> LrPrediction:
    """rho_k(T) of full-batch GD on the frozen fine-tuning loss, for every lr in ``lrs``.

    Args:
      base, unlearned: UNets at theta_0 and theta_u.
      batches: frozen fine-tuning probe batches (:func:`finetune_probe_batches`).
      lrs: GD step sizes; or ``lr_fractions``: step sizes as fractions of GD's stability limit
        2 / lambda_max, with lambda_max the largest measured eigenvalue (give exactly one).
      steps: step counts T. top_k: eigenpairs per spectrum end.
      params: measured (and fine-tuned) parameter group. seed: Lanczos start vector.
      tol: Lanczos relative accuracy of the Ritz values (1e-4 is far below the law's other
        errors and needs fewer Hessian-vector products than eigsh's machine precision).
      hvp_method: one of :data:`bridge.curvature.HVP_METHODS`.

    Returns:
      :class:`LrPrediction`.
    """
    if (lrs is None) == (lr_fractions is None):
        raise ValueError("give exactly one of `lrs` and `lr_fractions`.")
    group = select_group(base, params)
    delta = forget_displacement(base, unlearned, group)
    loss = FrozenDiffusionLoss(unlearned, group, batches)
    op = HessianOperator(loss, loss.theta(), method=hvp_method)
    ends = spectrum_ends(op, top_k, seed=seed, tol=tol)
    grad = op.gradient()
    if lr_fractions is not None:
        lam_max = float(np.max(ends.eigenvalues))
        if lam_max <= 0:
            raise ValueError(
                "no positive curvature measured: `lr_fractions` of 2/lambda_max undefined."
            )
        lrs = [float(f) * 2.0 / lam_max for f in lr_fractions]

    def matvec(v):
        return (op @ torch.as_tensor(v, dtype=op.dtype, device=op.device)).cpu().double().numpy()

    preds = [
        predicted_rho(ends.eigenvalues, ends.eigenvectors, matvec, grad, delta, lr=lr, steps=steps)
        for lr in lrs
    ]
    return LrPrediction(
        lrs=np.asarray(lrs, dtype=np.float64),
        steps=np.asarray(steps),
        predicted_rho=np.stack([p.predicted_rho for p in preds]),
        negative_dominated=np.stack([p.negative_dominated for p in preds]),
        eigenvalues=ends.eigenvalues,
        spectral_weights=spectral_weights(ends.eigenvectors, delta),
        curvature_along_delta=float(curvature_along(op, delta)),
        num_hvps=int(op.num_matvecs),
    )
