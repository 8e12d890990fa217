r"""UCE (Gandikota et al. 2024): closed-form edit of every cross-attention K/V projection.

Composition (theory.md s.3): target = the anchor prompt's keys/values (theory's ``anchor``), mask =
every ``attn2.to_k`` / ``attn2.to_v`` (or V only, the ``uce_v`` variant), solver = the ridge
closed form :func:`bridge.unlearning.solvers.ridge`. Defaults from the paper and
rohitgandikota/unified-concept-editing: lam 0.1, the empty prompt as anchor, scales 1.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

import torch

from bridge.unlearning.solvers import ridge

__all__ = ["UCE_EDITS", "UCEConcepts", "apply_uce", "uce_closed_form", "uce_token_embeddings"]

#: Which cross-attention projections UCE edits.
UCE_EDITS: dict[str, str] = {"kv": r"attn2\.to_[kv]$", "v": r"attn2\.to_v$", "k": r"attn2\.to_k$"}


def uce_closed_form(
    weight: torch.Tensor,
    erase: torch.Tensor,
    anchor: torch.Tensor,
    preserve: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    r"""UCE's closed-form edit of one projection matrix (Gandikota et al. 2024, eq. 7).

    .. math::
        W' = \Big(\lambda W_0 + \sum_e W_0 c_{a,e} c_e^\top + \sum_p W_0 c_p c_p^\top\Big)
             \Big(\lambda I + \sum_e c_e c_e^\top + \sum_p c_p c_p^\top\Big)^{-1}

    The minimiser of :math:`\sum_e \|W c_e - W_0 c_{a,e}\|^2 + \sum_p \|W c_p - W_0 c_p\|^2 +
    \lambda \|W - W_0\|_F^2` (theory.md s.3, "UCE is exact ridge regression on V").

    Args:
      weight: :math:`W_0`, shape ``(d_out, d_in)``.
      erase: erased token embeddings :math:`c_e` as rows, shape ``(n_e, d_in)``.
      anchor: their anchor embeddings :math:`c_{a,e}`, row-aligned with ``erase``, ``(n_e, d_in)``.
      preserve: preserved token embeddings, ``(n_p, d_in)`` or None.
      lam: ridge strength :math:`\lambda > 0`; erase_scale / preserve_scale multiply the sums.

    Returns:
      :math:`W'`, shape ``(d_out, d_in)``, in ``weight``'s dtype (computed in float64).

    Raises:
      ValueError: on mismatched shapes or ``lam <= 0`` with a singular system.

    >>> w = torch.eye(2); e = torch.tensor([[1.0, 0.0]]); a = torch.tensor([[0.0, 1.0]])
    >>> uce_closed_form(w, e, a, lam=1.0)  # column 0 moves half way to W0 a = e_2
    tensor([[0.5000, 0.0000],
            [0.5000, 1.0000]])
    """
    if erase.shape != anchor.shape:
        raise ValueError(
            f"`erase` {tuple(erase.shape)} and `anchor` {tuple(anchor.shape)} must be row-aligned."
        )
    if erase.ndim != 2 or erase.shape[1] != weight.shape[1]:
        raise ValueError(
            f"`erase` must be (n_e, {weight.shape[1]}) to match `weight` {tuple(weight.shape)}, "
            f"got {tuple(erase.shape)}."
        )
    values = anchor.double() @ weight.detach().double().cpu().T  # v_e = W0 c_a, row-stacked
    return ridge(
        weight,
        erase,
        values,
        preserve,
        lam=lam,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
    )


@dataclasses.dataclass(frozen=True)
class UCEConcepts:
    """Row-stacked token embeddings for UCE: erase/anchor pairs and preserved tokens.

    Attributes:
      erase: ``(n_e, d)``; anchor: ``(n_e, d)`` row-aligned; preserve: ``(n_p, d)`` (may be empty).
    """

    erase: torch.Tensor
    anchor: torch.Tensor
    preserve: torch.Tensor


def _n_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def uce_token_embeddings(
    text_encoder,
    erase: Sequence[str],
    anchors: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    from_token: Literal["last", "first"] = "last",
) -> UCEConcepts:
    """Token embeddings c_e, c_a, c_p as the UCE code takes them.

    For each erased prompt and its anchor, the tokens from the last word to the end of the
    context (``<eos>`` and padding included: in a causal text encoder these carry the whole
    prompt) are paired position by position, the longer tail cut so both have the same length.
    Preserved prompts contribute their tokens from the last word on. ``from_token="first"``
    starts at the first word instead (every token after ``<bos>``): needed when the word that
    identifies the concept is not the last one ("a *red* circle" among other circles), because
    the UNet still attends to the unedited earlier tokens.

    Args:
      text_encoder: :class:`bridge.sd.TextEncoder` (tokenizer + CLIP text model).
      erase: erased prompts (at least one). anchors: one anchor per erased prompt (default:
        the empty prompt, UCE's default). preserve: prompts whose outputs must not move.

    Returns:
      :class:`UCEConcepts`.

    Raises:
      ValueError: if ``erase`` is empty or ``anchors`` has another length.
    """
    if isinstance(erase, str) or len(erase) == 0:
        raise ValueError(f"`erase` must be a non-empty list of prompts, got {erase!r}.")
    anchors = [""] * len(erase) if anchors is None else list(anchors)
    if len(anchors) != len(erase):
        raise ValueError(
            f"`anchors` has {len(anchors)} prompts for {len(erase)} erased prompts; give one each."
        )
    if from_token not in ("last", "first"):
        raise ValueError(f"`from_token` must be 'last' or 'first', got {from_token!r}.")
    tok = text_encoder.tokenizer

    def start(prompt: str) -> int:
        return 1 if from_token == "first" else max(_n_tokens(tok, prompt) - 2, 0)

    emb = text_encoder.encode_prompts(list(erase) + anchors + list(preserve)).double().cpu()
    seq = emb.shape[1]
    rows_e, rows_a, rows_p = [], [], []
    for i, (pe, pa) in enumerate(zip(erase, anchors, strict=True)):
        ie, ia = start(pe), start(pa)
        length = seq - max(ie, ia)
        rows_e.append(emb[i, ie : ie + length])
        rows_a.append(emb[len(erase) + i, ia : ia + length])
    for j, pp in enumerate(preserve):
        ip = start(pp)
        rows_p.append(emb[2 * len(erase) + j, ip:])
    d = emb.shape[-1]
    preserve_rows = torch.cat(rows_p) if rows_p else torch.zeros(0, d, dtype=torch.float64)
    return UCEConcepts(torch.cat(rows_e), torch.cat(rows_a), preserve_rows)


def apply_uce(
    unet,
    concepts: UCEConcepts,
    *,
    edit: Literal["kv", "v", "k"] = "kv",
    lam: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
):
    """Edit every cross-attention ``to_k``/``to_v`` of a copy of ``unet`` by UCE's closed form.

    Args:
      unet: the base ``UNet2DConditionModel`` (not modified).
      concepts: token embeddings from :func:`uce_token_embeddings` (several concepts at once).
      edit: which projections: ``"kv"`` (published UCE), ``"v"`` (V only) or ``"k"``.
      lam, erase_scale, preserve_scale: as in :func:`uce_closed_form`.

    Returns:
      The edited copy (eval mode).

    Raises:
      ValueError: for an unknown ``edit`` or a UNet with no cross-attention projection.
    """
    if edit not in UCE_EDITS:
        raise ValueError(f"`edit` must be one of {sorted(UCE_EDITS)}, got {edit!r}.")
    pattern = re.compile(UCE_EDITS[edit])
    edited = copy.deepcopy(unet).eval()
    modules = [(n, m) for n, m in edited.named_modules() if pattern.search(n)]
    if not modules:
        raise ValueError(f"no module of {type(unet).__name__} matches {UCE_EDITS[edit]!r}.")
    with torch.no_grad():
        for _, module in modules:
            w = module.weight
            new = uce_closed_form(
                w.detach().cpu(),
                concepts.erase,
                concepts.anchor,
                concepts.preserve,
                lam=lam,
                erase_scale=erase_scale,
                preserve_scale=preserve_scale,
            )
            w.copy_(new.to(w))
    return edited
