"""Concept unlearning on diffusers UNets: UCE (closed form) and ESD-x / ESD-u (fine-tuning).

Each method is (target, parameter mask, solver), theory.md section 3:

- UCE: target = the anchor prompt's cross-attention keys/values, mask = every ``attn2.to_k`` /
  ``attn2.to_v`` (or V only), solver = closed-form ridge regression (:func:`uce_closed_form`).
- ESD: target = negative guidance of the frozen original model (:func:`esd_target`), mask =
  cross-attention (ESD-x) or everything else (ESD-u), solver = Adam for ``steps`` steps.

Results are saved with :func:`bridge.unlearn_io.save_unlearned` (diffusers folder + manifest).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

__all__ = [
    "ESD_MASKS",
    "UCE_EDITS",
    "apply_uce",
    "esd",
    "esd_target",
    "uce_closed_form",
    "uce_token_embeddings",
    "UCEConcepts",
]

#: Which cross-attention projections UCE edits.
UCE_EDITS: dict[str, str] = {"kv": r"attn2\.to_[kv]$", "v": r"attn2\.to_v$", "k": r"attn2\.to_k$"}

#: ESD variant -> predicate over parameter names (True = trained).
ESD_MASKS = {
    # ESD-x: cross-attention only (the official code's "xattn": names containing attn2)
    "x": lambda name: "attn2" in name,
    # ESD-u: every non-cross-attention layer (official "noxattn": also skips time embedding, out)
    "u": lambda name: not ("attn2" in name or "time_emb" in name or name.startswith("conv_out")),
}


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
    w0 = weight.double()
    e, a = erase.double(), anchor.double()
    d_in = w0.shape[1]
    lhs = lam * w0 + erase_scale * (w0 @ a.T) @ e
    gram = lam * torch.eye(d_in, dtype=torch.float64) + erase_scale * e.T @ e
    if preserve is not None and preserve.numel():
        p = preserve.double()
        if p.shape[1] != d_in:
            raise ValueError(f"`preserve` must have {d_in} columns, got {tuple(p.shape)}.")
        lhs = lhs + preserve_scale * (w0 @ p.T) @ p
        gram = gram + preserve_scale * p.T @ p
    # W' gram = lhs  <=>  gram^T W'^T = lhs^T (gram symmetric)
    try:
        solved = torch.linalg.solve(gram, lhs.T).T
    except RuntimeError as err:  # singular: lam = 0 with too few directions
        raise ValueError(f"UCE system is singular (lam={lam}); use lam > 0. ({err})") from err
    return solved.to(weight.dtype)


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
      text_encoder: :class:`bridge.tiny.TextEncoder` (tokenizer + CLIP text model).
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


def esd_target(eps_null: torch.Tensor, eps_concept: torch.Tensor, guidance: float) -> torch.Tensor:
    r"""ESD's negative-guidance target from the frozen original model.

    .. math::
        \epsilon^\star = \epsilon_0(x_t, \varnothing)
        - g\,(\epsilon_0(x_t, c_f) - \epsilon_0(x_t, \varnothing))

    >>> esd_target(torch.tensor([1.0]), torch.tensor([3.0]), 2.0)
    tensor([-3.])
    """
    return eps_null - guidance * (eps_concept - eps_null)


@torch.no_grad()
def _partial_ddim(unet, ddim, x, cond, uncond, n_steps: int, guidance_scale: float):
    """Run the first ``n_steps`` DDIM steps from x_T with guidance; return (x_t, t)."""
    for t in ddim.timesteps[:n_steps]:
        both = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
        eu, ec = both.chunk(2)
        x = ddim.step(eu + guidance_scale * (ec - eu), t, x).prev_sample
    return x, ddim.timesteps[n_steps]


def esd(
    unet,
    text_encoder,
    scheduler,
    concepts: Sequence[str],
    *,
    variant: Literal["x", "u"] = "x",
    steps: int = 200,
    lr: float = 1e-5,
    guidance: float = 1.0,
    start_guidance: float = 3.0,
    ddim_steps: int = 20,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
):
    r"""ESD (Gandikota et al. 2023): fine-tune so that :math:`\epsilon_\theta(x_t, c_f)` follows
    :func:`esd_target` of the frozen original model.

    As in the official code, x_t comes from partially sampling the *current* model with the
    concept prompt (DDIM, guidance ``start_guidance``) to a random step; the loss is
    :math:`\|\epsilon_\theta(x_t, c_f) - \epsilon^\star\|^2`. ``variant="x"`` trains the
    cross-attention parameters (ESD-x), ``"u"`` every non-cross-attention layer (ESD-u).

    Args:
      unet: base UNet (not modified). text_encoder: :class:`bridge.tiny.TextEncoder`.
      scheduler: training scheduler (its config builds the DDIM sampler).
      concepts: prompts to erase (one drawn per batch element; several at once allowed).
      variant: ``"x"`` or ``"u"``. steps, lr: Adam. guidance: negative guidance g.
      start_guidance, ddim_steps: how x_t is produced. batch_size: x_t per step.
      seed: seed of timesteps and starting noise.

    Returns:
      The unlearned copy (eval mode).

    Raises:
      ValueError: if ``concepts`` is empty or ``variant`` unknown.
    """
    from diffusers import DDIMScheduler

    if isinstance(concepts, str) or len(concepts) == 0:
        raise ValueError(f"`concepts` must be a non-empty list of prompts, got {concepts!r}.")
    if variant not in ESD_MASKS:
        raise ValueError(f"`variant` must be one of {sorted(ESD_MASKS)}, got {variant!r}.")
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    student = copy.deepcopy(unet).eval()
    trained = ESD_MASKS[variant]
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(trained(name))
        if trained(name):
            params.append(p)
    opt = torch.optim.Adam(params, lr=lr)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(ddim_steps)
    emb = text_encoder.encode_prompts(list(concepts) + [""]).to(next(unet.parameters()))
    cond_all, uncond = emb[:-1], emb[-1:]
    gen = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for _ in tqdm(range(steps), desc=f"esd-{variant}", disable=not progress):
        which = torch.randint(0, len(concepts), (batch_size,), generator=gen)
        cond = cond_all[which]
        u = uncond.expand(batch_size, -1, -1)
        n_steps = int(torch.randint(0, ddim_steps - 1, (1,), generator=gen))
        x = torch.randn((batch_size, *shape), generator=gen).to(cond)
        xt, t = _partial_ddim(student, ddim, x, cond, u, n_steps, start_guidance)
        with torch.no_grad():
            both = frozen(torch.cat([xt, xt]), t, torch.cat([u, cond])).sample
            e0_null, e0_c = both.chunk(2)
            target = esd_target(e0_null, e0_c, guidance)
        pred = student(xt, t, cond).sample
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.requires_grad_(True).eval()
