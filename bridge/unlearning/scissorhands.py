r"""Scissorhands / SHS (Wu & Harandi 2024): trim the most forget-sensitive weights, then repair.

Composition (theory.md s.3; theory's ``scissorhands`` preset):

- mask :func:`~bridge.unlearning.masks.reset_repair`: connection sensitivity (SNIP)
  :math:`|\theta \odot g|`, :math:`g = \sum_b |\nabla_\theta L_f^{(b)}|` over ``prune_batches``
  forget batches of the standard diffusion loss, ranks all UNet entries; the top
  ``1 - sparsity`` fraction is reset to 0; then every parameter trains (the repair);
- target :func:`~bridge.unlearning.targets.relabel` weighted by ``lam``: the erased prompt's
  output is pulled to the (detached) output for the pseudo prompt on the same noisy image;
- the standard loss on retain data (weight 1); solver Adam.

Defaults from JingWu321/Scissorhands ``SD/train_shs.sh`` (``shs.py --train_method full --sparsity
0.995 --lam 0.1 --prune_num 10 --lr 1e-5 --epochs 5 --batch_size 16``); ``shs.py`` relabels the
forget images to "a photo of a person wearing clothes", the retain concept. Two deliberate
differences: the reset sets entries to 0 (SNIP's trim), where ``shs.py`` re-initialises them
(Kaiming-uniform weights, zero biases) and only inside ``attn1`` of ``output_blocks.4``/``7``; and
the ranking covers the whole UNet, so "the reset entries are the most sensitive ones" holds
exactly. The optional GEM gradient projection (``--project``, off by default) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.unlearning import masks, solvers, targets
from bridge.unlearning.compose import (
    ComposedResult,
    anchor_prompts,
    compose,
    epoch_steps,
    run_composed,
)
from bridge.unlearning.data import UnlearningData, diffusion_loss

__all__ = ["scissorhands", "snip_loss"]


def snip_loss(model, scheduler, batch, prompts, guidance: float | None = None):
    r"""SNIP's loss: the diffusion loss on the forget batch (``shs.py``), or with ``guidance`` s the
    guided one :math:`\|y - ((1+s)\hat y(c_f) - s\hat y(\varnothing))\|^2` (``shs_cls.py``, s = 7.5)."""
    if guidance is None:
        return diffusion_loss(model, scheduler, batch, prompts.forget)
    return targets.guided_saliency_loss(model, scheduler, batch, prompts, guidance)


def scissorhands(
    unet,
    text_encoder,
    scheduler,
    data: UnlearningData,
    *,
    anchors: Sequence[str] | str,
    sparsity: float = 0.995,
    prune_batches: int = 10,
    snip_guidance: float | None = None,
    reset_params: str = "full",
    lam: float = 0.1,
    lr: float = 1e-5,
    epochs: int = 5,
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> ComposedResult:
    """Scissorhands on a copy of ``unet`` (module docstring).

    Args:
      unet, text_encoder, scheduler: the base pipeline's parts (the UNet is not modified).
      data: forget images and retain images (the repair needs retain data).
      anchors: the pseudo prompt(s) of the forget term.
      sparsity: fraction of entries kept, in (0, 1); ``1 - sparsity`` are reset.
      prune_batches: forget batches summed into the SNIP scores. snip_guidance: None (plain
        diffusion loss, ``shs.py``) or the guidance of ``shs_cls.py``'s guided loss (7.5).
      reset_params: the parameter set ranked and reset (``full``; see
        :data:`~bridge.unlearning.masks.PARAMETER_SETS`). lam: forget-term weight.
      lr, epochs, batch_size: Adam; ``steps`` overrides ``epochs`` passes over the forget data.
      seed: seed of every draw.

    Returns:
      :class:`~bridge.unlearning.compose.ComposedResult`; ``selection.reset`` holds the reset entries.

    Raises:
      ValueError: sparsity outside (0, 1), bad anchors, or no retain data.
    """
    erase = list(dict.fromkeys(data.forget_prompts))
    n_f = data.forget_images.shape[0]
    method = compose(
        targets.relabel("student"),
        masks.reset_repair(sparsity, params=reset_params, repair="full"),
        solvers.adam(lr, steps or epoch_steps(n_f, batch_size, epochs)),
        forget_weight=lam,
        retain_weight=1.0,
        batch_size=batch_size,
        name="scissorhands",
    )
    return run_composed(
        method,
        unet,
        text_encoder,
        scheduler,
        data,
        anchors=anchor_prompts(erase, anchors),
        score_loss=lambda m, sch, b, p: snip_loss(m, sch, b, p, snip_guidance),
        score_batches=prune_batches,
        score_absolute_each=True,
        seed=seed,
        progress=progress,
    )
