r"""MACE (Lu et al. 2024): mass concept erasure by closed-form refinement, LoRAs and their fusion.

Three stages, each a target x mask x solver composition on every ``attn2.to_k`` / ``attn2.to_v``:

1. **Closed-form refinement** (:func:`closed_form_refinement`, theory's ``mace`` preset): the
   words that co-occur with the concept carry its information through the causal text encoder;
   their keys/values are mapped to those of the mapping prompt. For each prompt pair (erased,
   mapped), the tokens outside the concept (the common prefix and suffix, MACE's
   ``find_matching_indices``, padding included) give contexts :math:`c_i` and targets
   :math:`v_i = W_0 c_i^{map}`; then :func:`~bridge.unlearning.solvers.ridge` with the preserved
   prompts' tokens at scale ``train_preserve_scale * preserve_weight``.
2. **One LoRA per concept** (:func:`~bridge.unlearning.mace_lora.train_concept_lora`): suppress
   the concept tokens' attention inside the concept's masks.
3. **Fusion** (:func:`fuse_loras`): one closed form for all concepts,
   :math:`\min_W \sum_i \sum_{c \in C_i}\|W c - (W_{cfr} + B_i A_i) c\|^2 + s\sum_p\|W c_p -
   W_0 c_p\|^2 + \lambda\|W - W_{cfr}\|^2`, C_i every token of concept i's prompts.

Defaults from Shilin-LU/MACE (``configs/celebrity/erase_cele_*.yaml``, ``src/cfr_utils.py``,
``src/fuse_lora_close_form.py``) as the paper's resurgence runs used them: rank 1, lr 1e-4, 50
steps, train/fuse preserve scale 1e-4, preserve weight 5e4, ``use_pooler``, importance sampling.
MACE's configs set ``lamb = 0`` and add a cache of COCO-caption statistics (``cache_coco.pt``) to
the preserve terms; without that cache the system is singular for few prompts, so ``lam``
defaults to 0.1 (UCE's value; pass 0 with enough preserve prompts). Prompt augmentation (30
templates for SD) is ``templates``; the default is the prompt itself.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch

from bridge.unlearning.mace_lora import KV_PATTERN, LoRA, train_concept_lora
from bridge.unlearning.solvers import ridge

__all__ = [
    "MaceConcept",
    "closed_form_refinement",
    "find_matching_indices",
    "fuse_loras",
    "mace",
    "refinement_pairs",
]


@dataclasses.dataclass(frozen=True)
class MaceConcept:
    """One erased concept: its prompt, images of it and their masks.

    Attributes:
      prompt: the erased prompt (the concept phrase, e.g. ``"a red circle"``).
      images: ``(n, C, H, W)`` in the UNet's input space, or None (no LoRA stage for it).
      masks: ``(n, 1, H', W')`` in [0, 1] (1 = the concept) or None (every pixel).
    """

    prompt: str
    images: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and (
            self.images is None or self.masks.shape[0] != self.images.shape[0]
        ):
            n = 0 if self.images is None else self.images.shape[0]
            raise ValueError(
                f"concept {self.prompt!r} has {self.masks.shape[0]} masks for {n} images; give "
                "one mask per image."
            )


def find_matching_indices(old: Sequence[int], new: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the common prefix and suffix of two token sequences (MACE's rule).

    >>> find_matching_indices([2, 4, 9, 5, 3], [2, 4, 5, 3])
    ([0, 1, 3, 4], [0, 1, 2, 3])
    """
    start = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old -= 1
        end_new -= 1
    return (
        list(range(start)) + list(range(end_old + 1, len(old))),
        list(range(start)) + list(range(end_new + 1, len(new))),
    )


def refinement_pairs(text_encoder, old_prompts: Sequence[str], new_prompts: Sequence[str]):
    """Contexts (old tokens outside the concept) and mapped rows (new tokens), row-aligned.

    As MACE's ``prepare_k_v``: the matched positions are extended to the end of the context
    (padding carries the prompt in a causal encoder), both tails cut to the same length.

    Returns:
      (contexts ``(n, d)``, mapped ``(n, d)``), float64.
    """
    tok = text_encoder.tokenizer
    seq = tok.model_max_length
    emb = text_encoder.encode_prompts(list(old_prompts) + list(new_prompts)).double().cpu()
    contexts, mapped = [], []
    for i, (po, pn) in enumerate(zip(old_prompts, new_prompts, strict=True)):
        a = tok(po, truncation=True, max_length=seq).input_ids
        b = tok(pn, truncation=True, max_length=seq).input_ids
        io, ino = find_matching_indices(a, b)
        shift = io[-1] - ino[-1]  # both tails run to the end of the context, cut to one length
        io = io + list(range(io[-1] + 1, seq - max(-shift, 0)))
        ino = ino + list(range(ino[-1] + 1, seq - max(shift, 0)))
        contexts.append(emb[i, io])
        mapped.append(emb[len(old_prompts) + i, ino])
    return torch.cat(contexts), torch.cat(mapped)


def _kv_modules(unet):
    return [(n, m) for n, m in unet.named_modules() if KV_PATTERN.search(n)]


def _tokens(text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Every token embedding of ``prompts`` as rows ``(len * seq, d)`` (float64)."""
    if not prompts:
        return torch.zeros(0, 0, dtype=torch.float64)
    emb = text_encoder.encode_prompts(list(prompts)).double().cpu()
    return emb.reshape(-1, emb.shape[-1])


def closed_form_refinement(
    unet,
    text_encoder,
    erase: Sequence[str],
    mapping: Sequence[str],
    preserve: Sequence[str] = (),
    *,
    templates: Sequence[str] = ("{}",),
    lam: float = 0.1,
    preserve_scale: float = 1e-4 * 5e4,
):
    """Stage 1 on a copy of ``unet`` (module docstring); returns the refined copy.

    Args:
      unet: the base UNet (not modified). text_encoder: its text encoder.
      erase: erased prompts. mapping: one mapping prompt each (e.g. ``"a person"``).
      preserve: prompts whose keys/values are kept. templates: prompt templates (``"{}"``).
      lam: ridge lambda. preserve_scale: s = train_preserve_scale * preserve_weight.

    Raises:
      ValueError: ``mapping`` of another length, or a singular system.
    """
    if len(mapping) != len(erase):
        raise ValueError(
            f"`mapping` has {len(mapping)} prompts for {len(erase)} erased concepts; give one each."
        )
    old = [t.format(e) for e in erase for t in templates]
    new = [t.format(m) for m in mapping for t in templates]
    contexts, mapped = refinement_pairs(text_encoder, old, new)
    kept = _tokens(text_encoder, preserve) if preserve else None
    edited = copy.deepcopy(unet).eval()
    with torch.no_grad():
        for _, module in _kv_modules(edited):
            w0 = module.weight
            values = mapped @ w0.detach().double().cpu().T
            module.weight.copy_(
                ridge(w0, contexts, values, kept, lam=lam, preserve_scale=preserve_scale)
            )
    return edited


def fuse_loras(
    refined,
    base,
    text_encoder,
    loras: Sequence[LoRA],
    concept_prompts: Sequence[Sequence[str]],
    preserve: Sequence[str] = (),
    *,
    lam: float = 0.1,
    preserve_scale: float = 1e-4 * 5e4,
):
    """Stage 3: fuse one LoRA per concept into ``refined`` in closed form (module docstring).

    Args:
      refined: the stage-1 UNet (W_cfr; not modified). base: the original UNet (W_0 for the
        preserve terms). loras: one :class:`LoRA` per concept.
      concept_prompts: concept i's prompts (every token is a context of LoRA i).
      preserve: prompts kept at the original's outputs. lam, preserve_scale: as in stage 1.

    Raises:
      ValueError: ``loras`` and ``concept_prompts`` of different lengths, or a singular system.
    """
    if len(loras) != len(concept_prompts):
        raise ValueError(f"{len(loras)} LoRAs for {len(concept_prompts)} concepts; give one each.")
    contexts = [_tokens(text_encoder, p) for p in concept_prompts]
    kept = _tokens(text_encoder, preserve) if preserve else None
    fused = copy.deepcopy(refined).eval()
    originals = dict(_kv_modules(base))
    with torch.no_grad():
        for name, module in _kv_modules(fused):
            w = module.weight.detach().double().cpu()
            values = torch.cat(
                [
                    c @ (w + lora.delta(name).double().cpu()).T
                    for c, lora in zip(contexts, loras, strict=True)
                ]
            )
            w0 = originals[name].weight.detach().double().cpu()
            module.weight.copy_(
                ridge(
                    module.weight,
                    torch.cat(contexts),
                    values,
                    kept,
                    lam=lam,
                    preserve_scale=preserve_scale,
                    preserve_values=None if kept is None else kept @ w0.T,
                )
            )
    return fused


def mace(
    unet,
    text_encoder,
    scheduler,
    concepts: Sequence[MaceConcept],
    *,
    mapping: Sequence[str] | str = "",
    preserve: Sequence[str] = (),
    templates: Sequence[str] = ("{}",),
    rank: int = 1,
    lr: float = 1e-4,
    lora_steps: int = 50,
    lam: float = 0.1,
    train_preserve_scale: float = 1e-4,
    fuse_preserve_scale: float = 1e-4,
    preserve_weight: float = 5e4,
    use_pooler: bool = True,
    importance_sampling: bool = True,
    seed: int = 0,
    progress: bool = True,
):
    """MACE on a copy of ``unet``: refinement, one LoRA per concept, fusion (module docstring).

    Args:
      unet, text_encoder, scheduler: the base pipeline's parts (the UNet is not modified).
      concepts: the erased concepts (10 or more at once is fine), each with images (+ masks).
      mapping: the mapping prompt (one for all, or one per concept; ``""`` = the null prompt).
      preserve: prompts to keep. templates: prompt templates containing ``{}``.
      rank, lr, lora_steps: each LoRA's training. lam: ridge lambda of both closed forms.
      train_preserve_scale, fuse_preserve_scale, preserve_weight: MACE's preserve strengths.
      use_pooler, importance_sampling: as in :func:`~bridge.unlearning.mace_lora.train_concept_lora`.
      seed: LoRA i uses seed ``seed + i``.

    Returns:
      The unlearned UNet (eval mode).

    Raises:
      ValueError: no concepts, rank < 1, mappings that do not match the concepts, or a concept
        without images.
    """
    from tqdm.auto import tqdm

    if not concepts:
        raise ValueError("`concepts` is empty; give at least one concept to erase.")
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1 (LoRA rank), got {rank}.")
    erase = [c.prompt for c in concepts]
    maps = [mapping] * len(erase) if isinstance(mapping, str) else list(mapping)
    refined = closed_form_refinement(
        unet,
        text_encoder,
        erase,
        maps,
        preserve,
        templates=templates,
        lam=lam,
        preserve_scale=train_preserve_scale * preserve_weight,
    )
    if lora_steps == 0:
        return refined
    loras, prompts = [], []
    for i, concept in enumerate(tqdm(concepts, desc="mace loras", disable=not progress)):
        if concept.images is None:
            raise ValueError(f"concept {concept.prompt!r} has no images for its LoRA.")
        ps = [t.format(concept.prompt) for t in templates]
        loras.append(
            train_concept_lora(
                refined,
                text_encoder,
                scheduler,
                ps,
                concept.prompt,
                concept.images,
                concept.masks,
                rank=rank,
                lr=lr,
                steps=lora_steps,
                use_pooler=use_pooler,
                importance_sampling=importance_sampling,
                seed=seed + i,
            )
        )
        prompts.append(ps)
    return fuse_loras(
        refined,
        unet,
        text_encoder,
        loras,
        prompts,
        preserve,
        lam=lam,
        preserve_scale=fuse_preserve_scale * preserve_weight,
    )
