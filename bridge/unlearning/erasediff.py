r"""EraseDiff (Wu et al. 2024): a bi-level objective, solved first-order (BOME).

.. math:: \min_\theta L_r(\theta)\quad\text{s.t.}\quad \theta \in \arg\min L_f,\qquad
          L_f(\theta) = \mathbb{E}\,\|\hat y_\theta(x_t, c_f) - \mathrm{sg}\,\hat y_\theta(x_t, c')\|^2

with x_t a noisy forget image and c' a prompt unrelated to the erased one (the noise target: the
model's output for c' on the same noisy image), L_r the standard diffusion loss on retain data.
BOME's first-order scheme (:func:`~bridge.unlearning.solvers.bome`): per epoch, ``k_steps`` Adam
steps on L_f from theta_i give :math:`\hat f = L_f(\theta_i^K)`; from theta_i, one pass over the
forget data descends :math:`L_r + \lambda_{bome}(L_f - \hat f)`.

Composition (theory.md s.3): target :func:`~bridge.unlearning.targets.relabel`, mask
``full`` (every UNet parameter), solver BOME. Theory's ``erasediff`` preset is the same bounded
noise-matching forget term on the linear model (a well-posed objective: no ascent).

Defaults from JingWu321/EraseDiff ``sd/train_scripts/erasediff_cls.py``: ``lambda_bome`` 0.1,
``K_steps`` 2, lr 1e-5 (Adam), batch 8, 5 epochs, pseudo prompt "a photo of a pokemon" (an
unrelated concept); ``train_method`` full as in ``train_cls.sh``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bridge.unlearning import masks, solvers, targets
from bridge.unlearning.compose import ComposedResult, anchor_prompts, compose, run_composed
from bridge.unlearning.data import UnlearningData

__all__ = ["erasediff"]


def erasediff(
    unet,
    text_encoder,
    scheduler,
    data: UnlearningData,
    *,
    anchors: Sequence[str] | str,
    lambda_bome: float = 0.1,
    k_steps: int = 2,
    lr: float = 1e-5,
    epochs: int = 5,
    steps_per_epoch: int | None = None,
    batch_size: int = 8,
    params: str = "full",
    seed: int = 0,
    progress: bool = True,
) -> ComposedResult:
    """EraseDiff on a copy of ``unet`` (module docstring).

    Args:
      unet, text_encoder, scheduler: the base pipeline's parts (the UNet is not modified).
      data: forget images and retain images (the outer problem needs retain data).
      anchors: the unrelated prompt(s) c' of the noise target.
      lambda_bome, k_steps: BOME's lambda and inner steps. lr: Adam's learning rate.
      epochs: outer epochs; ``steps_per_epoch`` defaults to one pass over the forget data.
      batch_size: images per batch. params: parameter set (``full`` as published).
      seed: seed of every draw.

    Returns:
      :class:`~bridge.unlearning.compose.ComposedResult`.

    Raises:
      ValueError: bad anchors, or no retain data.
    """
    erase = list(dict.fromkeys(data.forget_prompts))
    if not data.has_retain:
        raise ValueError(
            "EraseDiff descends the retain loss in its outer problem; give retain data "
            "(prompts to preserve)."
        )
    n_f = data.forget_images.shape[0]
    method = compose(
        targets.relabel("student"),
        masks.by_name(params),
        solvers.bome(
            lr, epochs, k_steps, lambda_bome, steps_per_epoch or math.ceil(n_f / batch_size)
        ),
        forget_weight=1.0,
        retain_weight=1.0,
        batch_size=batch_size,
        name="erasediff",
    )
    return run_composed(
        method,
        unet,
        text_encoder,
        scheduler,
        data,
        anchors=anchor_prompts(erase, anchors),
        seed=seed,
        progress=progress,
    )
