r"""Parameter masks: which entries of the UNet a method may move, and where it starts (theory.md s.3).

A :class:`Mask` turns the UNet (and, for the data-dependent masks, a per-tensor score) into a
:class:`Selection`: the trainable tensors, optionally an entry-wise 0/1 mask inside them, and
optionally entries reset before training.

- :func:`by_name`: the published ``train_method`` sets (``xattn`` = every ``attn2`` parameter,
  ``noxattn`` = everything but ``attn2``, the time embedding and ``conv_out``, ``full``, ``kv``).
- :func:`saliency`: SalUn's weight saliency, the top ``threshold`` fraction of entries by
  :math:`|\nabla_\theta L_f|` over the whole set (theory's ``saliency``).
- :func:`reset_repair`: Scissorhands' SNIP trim, the top ``1 - sparsity`` fraction by connection
  sensitivity :math:`|\theta \odot g|` reset to 0, then the ``repair`` set trains (theory's
  ``reset_repair``).

Top fractions are exact counts (``k`` entries, ties broken by position), so "the reset entries are
exactly the k most sensitive" is a checkable statement.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

__all__ = [
    "MASKS",
    "PARAMETER_SETS",
    "Mask",
    "Selection",
    "by_name",
    "parameter_names",
    "reset_repair",
    "saliency",
    "top_entries",
]

#: Published ``train_method`` names -> predicate over ``named_parameters()`` names.
PARAMETER_SETS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: "attn2" in name,
    # ESD / SDD / EraseDiff "noxattn": skip cross-attention, the time embedding and the output conv
    "noxattn": lambda name: (
        not ("attn2" in name or "time_emb" in name or name.startswith("conv_out"))
    ),
    "full": lambda name: True,
    "kv": lambda name: re.search(r"attn2\.to_[kv]\.", name) is not None,
    "v": lambda name: re.search(r"attn2\.to_v\.", name) is not None,
}


def parameter_names(unet, params: str) -> tuple[str, ...]:
    """Names of ``unet``'s parameters in the set ``params`` (``named_parameters()`` order).

    Raises:
      ValueError: an unknown set name (listing the valid ones) or an empty selection.
    """
    if params not in PARAMETER_SETS:
        raise ValueError(f"`params` must be one of {', '.join(PARAMETER_SETS)}, got {params!r}.")
    names = tuple(n for n, _ in unet.named_parameters() if PARAMETER_SETS[params](n))
    if not names:
        raise ValueError(f"parameter set {params!r} selects no parameter of the UNet.")
    return names


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a mask selected.

    Attributes:
      names: trainable tensors.
      entries: name -> bool tensor of trainable entries (None: whole tensors train).
      reset: name -> bool tensor of entries set to 0 before training (None: no reset).
    """

    names: tuple[str, ...]
    entries: dict[str, torch.Tensor] | None = None
    reset: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class Mask:
    """``select(unet, scores) -> Selection``; ``scores`` is name -> tensor or None."""

    name: str
    select: Callable
    needs_scores: bool = False


def top_entries(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Bool masks of the ``k`` largest entries over all tensors of ``scores`` (ties: lower index).

    Raises:
      ValueError: ``k`` outside [0, total number of entries].
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot pick {k} of {flat.numel()} entries.")
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start : start + size].reshape(scores[n].shape).to(scores[n].device)
        start += size
    return out


def _check_fraction(option: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{option}` must be in (0, 1), got {value!r}.")
    return value


def by_name(params: str = "full") -> Mask:
    """Whole tensors of a published parameter set (``xattn``, ``noxattn``, ``full``, ``kv``, ``v``)."""
    if params not in PARAMETER_SETS:
        raise ValueError(f"`params` must be one of {', '.join(PARAMETER_SETS)}, got {params!r}.")
    return Mask(params, lambda unet, scores=None: Selection(parameter_names(unet, params)))


def saliency(threshold: float = 0.5, params: str = "full") -> Mask:
    r"""SalUn: entries with the top ``threshold`` fraction of scores :math:`|\nabla L_f|` train.

    ``k = int(threshold * n)`` entries over the whole set, as ``generate_mask.py``'s
    ``threshold_index = int(len(all_elements) * i)``.

    Raises:
      ValueError: ``threshold`` outside (0, 1).
    """
    threshold = _check_fraction("threshold", threshold)

    def select(unet, scores):
        names = parameter_names(unet, params)
        n = sum(scores[name].numel() for name in names)
        entries = top_entries({name: scores[name] for name in names}, int(threshold * n))
        return Selection(names, entries=entries)

    return Mask("saliency", select, needs_scores=True)


def reset_repair(sparsity: float = 0.995, params: str = "full", repair: str = "full") -> Mask:
    r"""Scissorhands: reset the top ``1 - sparsity`` of :math:`|\theta \odot g|` to 0, repair ``repair``.

    ``scores`` are :math:`g = \sum_b |\nabla L_f^{(b)}|` (``snip`` in ``shs.py``); the reset count is
    ``n - int(sparsity * n)``, the entries above SHS's ``kthvalue(int(sparsity * n))`` threshold.

    Raises:
      ValueError: ``sparsity`` outside (0, 1).
    """
    sparsity = _check_fraction("sparsity", sparsity)

    def select(unet, scores):
        names = parameter_names(unet, params)
        own = dict(unet.named_parameters())
        sensitivity = {n: (own[n].detach() * scores[n]).abs() for n in names}
        total = sum(s.numel() for s in sensitivity.values())
        reset = top_entries(sensitivity, total - int(sparsity * total))
        return Selection(parameter_names(unet, repair), reset=reset)

    return Mask("reset_repair", select, needs_scores=True)


MASKS: dict[str, Callable[..., Mask]] = {
    "by_name": by_name,
    "saliency": saliency,
    "reset_repair": reset_repair,
}
