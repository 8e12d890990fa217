r"""Forget targets: what the UNet's output for the erased prompt is pulled towards (theory.md s.3).

Each target maps a noisy forget batch to a fixed regression target :math:`\tau(x_t, t)` (no
gradient flows through it); the forget term is then

.. math:: L_f(\theta) = \mathbb{E}\,\|\hat y_\theta(x_t, t, c_f) - \tau(x_t, t)\|^2 .

- :func:`relabel`: :math:`\tau = \mathrm{sg}\,\hat y(x_t, t, c_a)`, the model's own output for an
  anchor (pseudo) prompt on the *same* noisy image: SalUn's random labelling, EraseDiff's and
  Scissorhands' forget terms (theory's ``anchor`` target).
- :func:`null`: :math:`\tau = \mathrm{sg}\,\hat y(x_t, t, \varnothing)`: SDD's self-distillation
  (theory's ``null``).
- :func:`negative_guidance`: :math:`\tau = \hat y_0(\varnothing) - g(\hat y_0(c_f) -
  \hat y_0(\varnothing))` of the frozen original: ESD (theory's ``negative_guidance``).

``source="student"`` evaluates the target with the model being trained (detached), as the
published SalUn/EraseDiff/SHS/SDD code does; ``"frozen"`` with the original UNet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

__all__ = [
    "TARGETS",
    "Prompts",
    "Target",
    "forget_loss",
    "guided_saliency_loss",
    "negative_guidance",
    "null",
    "relabel",
]


class Prompts(NamedTuple):
    """Text embeddings ``(B, seq, dim)`` of one batch: erased prompt, anchor, null prompt."""

    forget: torch.Tensor
    anchor: torch.Tensor
    null: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Target:
    """A forget target: ``compute(student, frozen, xt, t, prompts) -> tau`` (no grad)."""

    name: str
    compute: Callable


def _model(source: str, student, frozen):
    if source not in ("student", "frozen"):
        raise ValueError(f"`source` must be 'student' or 'frozen', got {source!r}.")
    return student if source == "student" else frozen


def relabel(source: Literal["student", "frozen"] = "student") -> Target:
    """tau = the model's output for the anchor prompt on the same x_t (SalUn, EraseDiff, SHS)."""

    @torch.no_grad()
    def compute(student, frozen, xt, t, prompts: Prompts):
        return _model(source, student, frozen)(xt, t, prompts.anchor).sample

    return Target("relabel", compute)


def null(source: Literal["student", "frozen"] = "student") -> Target:
    """tau = the model's unconditional output on x_t (SDD: the student's, stop-gradient)."""

    @torch.no_grad()
    def compute(student, frozen, xt, t, prompts: Prompts):
        return _model(source, student, frozen)(xt, t, prompts.null).sample

    return Target("null", compute)


def negative_guidance(guidance: float = 1.0) -> Target:
    """tau = eps_0(x,0) - g (eps_0(x,c_f) - eps_0(x,0)) of the frozen original (ESD).

    Raises:
      ValueError: a negative or non-finite guidance.
    """
    g = float(guidance)
    if not 0.0 <= g < float("inf"):
        raise ValueError(f"`guidance` must be a finite number >= 0, got {guidance!r}.")

    @torch.no_grad()
    def compute(student, frozen, xt, t, prompts: Prompts):
        both = frozen(
            torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([prompts.null, prompts.forget])
        )
        e_null, e_c = both.sample.chunk(2)
        return e_null - g * (e_c - e_null)

    return Target("negative_guidance", compute)


def forget_loss(student, frozen, target: Target, xt, t, prompts: Prompts) -> torch.Tensor:
    r"""Mean of :math:`\|\hat y_\theta(x_t, t, c_f) - \tau\|^2` over the batch's entries."""
    tau = target.compute(student, frozen, xt, t, prompts)
    err = student(xt, t, prompts.forget).sample - tau
    return (err * err).mean()


def guided_saliency_loss(unet, scheduler, batch, prompts: Prompts, guidance: float) -> torch.Tensor:
    r"""SalUn's saliency loss: :math:`\|y - ((1+s)\hat y(c_f) - s\,\hat y(\varnothing))\|^2` (mean).

    y is the training target (eps or v). SalUn's ``generate_mask.py`` negates it (gradient
    ascent); the saliency uses |grad|, so the sign does not matter.
    """
    from bridge.unlearning.data import training_target

    both = unet(
        torch.cat([batch.xt, batch.xt]),
        torch.cat([batch.t, batch.t]),
        torch.cat([prompts.forget, prompts.null]),
    ).sample
    e_c, e_null = both.chunk(2)
    guided = (1 + guidance) * e_c - guidance * e_null
    err = training_target(scheduler, batch.x0, batch.noise, batch.t) - guided
    return (err * err).mean()


TARGETS: dict[str, Callable[..., Target]] = {
    "relabel": relabel,
    "null": null,
    "negative_guidance": negative_guidance,
}
