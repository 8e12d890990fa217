r"""target x mask x solver -> a fine-tuning unlearning method on a UNet (optax ``chain``'s role).

The objective of a composed method, on forget data (x_0 of the erased concept, prompt c_f) and
retain data (x_0 of kept concepts with their prompts), is

.. math:: J(\theta) = w_f\,\mathbb{E}\|\hat y_\theta(x_t, t, c_f) - \tau(x_t, t)\|^2
          + w_r\,\mathbb{E}\|\hat y_\theta(x_t, t, c_r) - y\|^2 ,

with :math:`\tau` from :mod:`bridge.unlearning.targets` and y the training target of the base
scheduler's ``prediction_type`` (theory.md s.3; :mod:`theory.unlearning.compose` is the exact
linear counterpart). The mask picks the trainable entries (and, for Scissorhands, resets some);
the solver runs the optimisation. SalUn, Scissorhands and EraseDiff are compositions of this
function; SDD, ESD, UCE and MACE reuse the same parts with their own data sources.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from bridge.unlearning import targets as targets_mod
from bridge.unlearning.data import UnlearningData, diffusion_loss, noisy_batch
from bridge.unlearning.masks import Mask, Selection
from bridge.unlearning.solvers import Objective, Solver

__all__ = [
    "ComposedResult",
    "FinetuneMethod",
    "anchor_prompts",
    "compose",
    "epoch_steps",
    "gradient_scores",
    "run_composed",
]


@dataclasses.dataclass(frozen=True)
class FinetuneMethod:
    """A composed method: the three parts, the loss weights and the batch size."""

    name: str
    target: targets_mod.Target
    mask: Mask
    solver: Solver
    forget_weight: float = 1.0
    retain_weight: float = 0.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.forget_weight < 0 or self.retain_weight < 0 or self.batch_size < 1:
            raise ValueError(
                f"method {self.name!r}: weights must be >= 0 and batch_size >= 1; got "
                f"forget_weight={self.forget_weight}, retain_weight={self.retain_weight}, "
                f"batch_size={self.batch_size}."
            )


class ComposedResult(NamedTuple):
    """The unlearned UNet (eval mode) and the mask's :class:`~bridge.unlearning.masks.Selection`."""

    unet: object
    selection: Selection


def compose(
    target, mask, solver, *, forget_weight=1.0, retain_weight=0.0, batch_size=8, name="custom"
) -> FinetuneMethod:
    """Compose a fine-tuning unlearning method from its parts (registry names allowed for targets).

    >>> from bridge.unlearning import masks, solvers
    >>> m = compose("relabel", masks.by_name("xattn"), solvers.adam(1e-5, 10), name="demo")
    >>> (m.target.name, m.mask.name, m.solver.name)
    ('relabel', 'xattn', 'adam')
    """
    if isinstance(target, str):
        if target not in targets_mod.TARGETS:
            raise ValueError(f"unknown target {target!r}; valid: {', '.join(targets_mod.TARGETS)}.")
        target = targets_mod.TARGETS[target]()
    return FinetuneMethod(
        name, target, mask, solver, float(forget_weight), float(retain_weight), int(batch_size)
    )


def anchor_prompts(erase: Sequence[str], anchors: Sequence[str] | str | None) -> dict[str, str]:
    """Map every erased prompt to its anchor: one anchor for all, one each, or None (the null prompt).

    Raises:
      ValueError: a list of anchors of another length, or an anchor equal to its erased prompt.
    """
    erase = list(erase)
    if anchors is None:
        anchors = [""] * len(erase)
    elif isinstance(anchors, str):
        anchors = [anchors] * len(erase)
    anchors = list(anchors)
    if len(anchors) == 1 and len(erase) > 1:
        anchors = anchors * len(erase)
    if len(anchors) != len(erase):
        raise ValueError(
            f"`anchors` has {len(anchors)} prompts for {len(erase)} erased prompts; give one, or "
            "one each."
        )
    for e, a in zip(erase, anchors, strict=True):
        if a == e:
            raise ValueError(f"the anchor of {e!r} is the erased prompt itself; choose another.")
    return dict(zip(erase, anchors, strict=True))


def gradient_scores(
    model,
    loss_fn: Callable,
    names: Sequence[str],
    gen: torch.Generator,
    batches: int,
    *,
    absolute_each: bool,
) -> dict[str, torch.Tensor]:
    r"""Per-entry gradient scores over ``batches`` draws of ``loss_fn(model, gen)``.

    ``absolute_each=False``: :math:`|\sum_b \nabla L_b|` (SalUn's ``generate_mask.py``);
    ``True``: :math:`\sum_b |\nabla L_b|` (Scissorhands' ``snip``).
    """
    own = dict(model.named_parameters())
    params = [own[n] for n in names]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    acc = [torch.zeros_like(p) for p in params]
    for _ in range(batches):
        grads = torch.autograd.grad(loss_fn(model, gen), params, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g.abs() if absolute_each else g)
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return {n: (a if absolute_each else a.abs()) for n, a in zip(names, acc, strict=True)}


class _Conditioning:
    """Embeddings of the data's prompts, the anchors and the null prompt, looked up by row."""

    def __init__(self, text_encoder, data: UnlearningData, anchors: dict[str, str], ref):
        prompts = sorted(
            set(data.forget_prompts) | set(data.retain_prompts) | set(anchors.values())
        )
        emb = text_encoder.encode_prompts(prompts + [""]).to(ref)
        table = {p: emb[i] for i, p in enumerate(prompts)}
        self.null = emb[-1]
        self.forget = torch.stack([table[p] for p in data.forget_prompts])
        self.anchor = torch.stack(
            [table[anchors[p]] if anchors[p] else emb[-1] for p in data.forget_prompts]
        )
        self.retain = (
            torch.stack([table[p] for p in data.retain_prompts]) if data.retain_prompts else None
        )

    def forget_batch(self, index) -> targets_mod.Prompts:
        b = index.shape[0]
        return targets_mod.Prompts(
            self.forget[index], self.anchor[index], self.null.expand(b, *self.null.shape)
        )


def _apply_reset(model, selection: Selection) -> None:
    if selection.reset is None:
        return
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, where in selection.reset.items():
            own[name].masked_fill_(where.to(own[name].device), 0.0)


def run_composed(
    method: FinetuneMethod,
    unet,
    text_encoder,
    scheduler,
    data: UnlearningData,
    *,
    anchors: dict[str, str] | None = None,
    score_loss: Callable | None = None,
    score_batches: int = 1,
    score_absolute_each: bool = False,
    seed: int = 0,
    progress: bool = True,
):
    """Run a composed method on a copy of ``unet``.

    Args:
      method: from :func:`compose`.
      unet: base ``UNet2DConditionModel`` (not modified). text_encoder: prompts -> embeddings.
      scheduler: the base scheduler (``add_noise``, ``prediction_type``).
      data: forget (and retain) images with prompts.
      anchors: erased prompt -> anchor prompt of the ``relabel`` target (:func:`anchor_prompts`);
        None or ``""`` = the null prompt.
      score_loss: ``(model, scheduler, batch, prompts) -> scalar`` whose gradients score the
        entries for a data-dependent mask (saliency, SNIP); its batches are forget batches.
      score_batches, score_absolute_each: see :func:`gradient_scores`.
      seed: seed of every batch, timestep and noise draw.

    Returns:
      :class:`ComposedResult` (the unlearned copy, the mask's selection).

    Raises:
      ValueError: a method with a retain term but no retain data, or a mask that needs scores
        given no ``score_loss``.
    """
    if method.retain_weight > 0 and not data.has_retain:
        raise ValueError(
            f"method {method.name!r} has a retain term (weight {method.retain_weight}) but the data "
            "has no retain images; give prompts to preserve (--preserve) or retain data."
        )
    ref = next(unet.parameters())
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    student = copy.deepcopy(unet).eval()
    anchors = anchors or {}
    cond = _Conditioning(
        text_encoder, data, {p: anchors.get(p, "") for p in data.forget_prompts}, ref
    )
    gen = torch.Generator().manual_seed(seed)
    bs = method.batch_size

    def forget(model, g):
        batch = noisy_batch(data.forget_images, scheduler, g, bs)
        return targets_mod.forget_loss(
            model, frozen, method.target, batch.xt, batch.t, cond.forget_batch(batch.index)
        )

    def retain(model, g):
        batch = noisy_batch(data.retain_images, scheduler, g, bs)
        return diffusion_loss(model, scheduler, batch, cond.retain[batch.index])

    scores = None
    if method.mask.needs_scores:
        if score_loss is None:
            raise ValueError(f"mask {method.mask.name!r} needs `score_loss` to score the entries.")

        def scored(model, g):
            batch = noisy_batch(data.forget_images, scheduler, g, bs)
            return score_loss(model, scheduler, batch, cond.forget_batch(batch.index))

        names = [n for n, _ in student.named_parameters()]
        scores = gradient_scores(
            student, scored, names, gen, score_batches, absolute_each=score_absolute_each
        )
    selection = method.mask.select(student, scores)
    _apply_reset(student, selection)
    objective = Objective(
        forget, retain if data.has_retain else None, method.forget_weight, method.retain_weight
    )
    student = method.solver.solve(
        student, selection, objective, gen, progress=progress, desc=method.name
    )
    return ComposedResult(student, selection)


def epoch_steps(n: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``n`` rows in batches of ``batch_size``."""
    return max(1, epochs * math.ceil(n / batch_size))
