r"""SalUn (Fan et al. 2024): relabel the erased prompt, updating only salient weights.

Composition (theory.md s.3; theory's ``salun`` preset):

- target :func:`~bridge.unlearning.targets.relabel`: the output for the erased prompt on a noisy
  forget image is pulled to the model's own (detached) output for a pseudo prompt on the same
  image, :math:`\|\hat y_\theta(x_t, c_f) - \mathrm{sg}\,\hat y_\theta(x_t, c')\|^2`, plus
  ``alpha`` times the standard loss on retain data;
- mask :func:`~bridge.unlearning.masks.saliency`: the top ``threshold`` fraction of all UNet
  entries by :math:`|\nabla_\theta L|` at theta_0, L the guided forget loss
  :math:`\|y - ((1+s)\hat y(c_f) - s\hat y(\varnothing))\|^2` with s = 7.5, summed over one pass of
  the forget data before taking the absolute value;
- solver :func:`~bridge.unlearning.solvers.adam` on the masked entries only.

Defaults, from OPTML-Group/Unlearn-Saliency ``SD/README.md`` (``generate_mask.py``, then
``random_label.py --train_method full --alpha 0.5 --lr 1e-5 --epochs 5``, mask ``with_0.5.pt``,
batch 8): threshold 0.5, mask guidance 7.5, alpha 0.5, Adam lr 1e-5, 5 epochs over the forget data.
The pseudo prompt is another concept's (``descriptions[(class + 1) % 10]`` in the code). The mask
keeps the *most* salient half, as the paper's eq. 5 says (some copies of ``generate_mask.py`` rank
ascending and keep the least salient half; the later ones negate the scores first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bridge.unlearning import masks, solvers, targets
from bridge.unlearning.compose import (
    ComposedResult,
    anchor_prompts,
    compose,
    epoch_steps,
    run_composed,
)
from bridge.unlearning.data import UnlearningData

__all__ = ["salun"]


def salun(
    unet,
    text_encoder,
    scheduler,
    data: UnlearningData,
    *,
    anchors: Sequence[str] | str,
    threshold: float = 0.5,
    mask_guidance: float = 7.5,
    alpha: float = 0.5,
    lr: float = 1e-5,
    epochs: int = 5,
    steps: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ComposedResult:
    """SalUn on a copy of ``unet`` (module docstring).

    Args:
      unet, text_encoder, scheduler: the base pipeline's parts (the UNet is not modified).
      data: forget images (prompts = erased prompts) and retain images (needed: alpha > 0).
      anchors: the pseudo prompt (one for all erased prompts, or one each).
      threshold: fraction of entries in the saliency mask, in (0, 1).
      mask_guidance: guidance s of the saliency loss. alpha: retain weight.
      lr, epochs, batch_size: Adam; ``steps`` overrides ``epochs`` passes over the forget data.
      seed: seed of every draw (batches, timesteps, noise).

    Returns:
      :class:`~bridge.unlearning.compose.ComposedResult`; ``selection.entries`` is the mask.

    Raises:
      ValueError: threshold outside (0, 1), anchors that do not match the erased prompts, or no
        retain data with alpha > 0.
    """
    erase = list(dict.fromkeys(data.forget_prompts))
    n_f = data.forget_images.shape[0]
    method = compose(
        targets.relabel("student"),
        masks.saliency(threshold, params="full"),
        solvers.adam(lr, steps or epoch_steps(n_f, batch_size, epochs)),
        forget_weight=1.0,
        retain_weight=alpha,
        batch_size=batch_size,
        name="salun",
    )
    return run_composed(
        method,
        unet,
        text_encoder,
        scheduler,
        data,
        anchors=anchor_prompts(erase, anchors),
        score_loss=lambda m, s, b, p: targets.guided_saliency_loss(m, s, b, p, mask_guidance),
        score_batches=math.ceil(n_f / batch_size),
        score_absolute_each=False,
        seed=seed,
        progress=progress,
    )
