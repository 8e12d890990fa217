r"""MACE's per-concept LoRA: suppress the concept tokens' cross-attention inside the concept's mask.

For one concept, a rank-r LoRA :math:`W + B A` on every ``attn2.to_k`` / ``attn2.to_v`` is trained
on images of the concept with

.. math:: L = \sum_{\ell \in \text{attn2}} \big\| P_\ell[:, \Omega, \mathcal{T}] \big\|_F ,

:math:`P_\ell` the attention probabilities (heads x pixels x tokens), :math:`\Omega` the pixels
of the concept's mask (resized to the layer's resolution, nearest), :math:`\mathcal{T}` the
positions of the concept's tokens in the prompt (plus the end-of-text token, ``use_pooler``).
Without a mask every pixel counts (MACE's style-erasure branch). Timesteps are drawn with MACE's
relation-focal importance sampling :math:`p(t) \propto \sigma(0.05(t-200)) - \sigma(0.05(t-400))`.

Composition: target = zero attention on the concept tokens, mask = a rank-r subspace of the K/V
projections, solver = AdamW. Defaults from Shilin-LU/MACE ``configs/celebrity/erase_cele_*.yaml``
and ``src/cfr_lora_training.py``: rank 1, lr 1e-4, 50 steps, AdamW weight decay 1e-2, batch 1,
grad clip 1, LoRA init as diffusers' ``LoRALinearLayer`` (A ~ N(0, 1/r^2), B = 0).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.func import functional_call

__all__ = ["KV_PATTERN", "LoRA", "concept_positions", "importance_weights", "train_concept_lora"]

#: The projections MACE edits: every cross-attention key and value.
KV_PATTERN = re.compile(r"attn2\.to_[kv]$")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank factors per module: name -> (A ``(r, d_in)``, B ``(d_out, r)``); delta = B A."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors[name]
        return b @ a


class _Recorder(AttnProcessor):
    """The classic attention processor, handing each layer's probabilities to ``sink``."""

    def __init__(self, sink, name: str) -> None:
        self.sink, self.name = sink, name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        scores = attn.get_attention_scores

        def recorded(query, key, mask=None):
            probs = scores(query, key, mask)
            self.sink(self.name, probs)
            return probs

        attn.get_attention_scores = recorded  # instance attribute: this call only
        try:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        finally:
            del attn.get_attention_scores


def importance_weights(num_train_timesteps: int, temperature: float = 0.05) -> torch.Tensor:
    """MACE's ``importance_sampling_fn`` over t = 0..T-1, normalised to a distribution."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    w = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return w / w.sum()


def concept_positions(
    tokenizer, prompt: str, concept: str, *, use_pooler: bool = True
) -> list[int]:
    """Token positions of ``concept`` inside ``prompt`` (every occurrence), plus end-of-text.

    Raises:
      ValueError: if ``concept``'s tokens do not occur in ``prompt``.
    """
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    sub = tokenizer(concept, add_special_tokens=False).input_ids
    found = []
    for i in range(len(ids) - len(sub) + 1):
        if sub and ids[i : i + len(sub)] == sub:
            found.extend(range(i, i + len(sub)))
    if not found:
        raise ValueError(f"the concept {concept!r} does not occur in the prompt {prompt!r}.")
    if use_pooler and tokenizer.eos_token_id is not None:
        found.extend(i for i, tok in enumerate(ids) if tok == tokenizer.eos_token_id)
    return sorted(set(found))


def _attention_loss(records, positions: list[int], masks: torch.Tensor | None, batch: int):
    total = 0.0
    for _, probs in records:
        heads = probs.shape[0] // batch
        side = int(math.isqrt(probs.shape[1]))
        for i in range(batch):
            p = probs[i * heads : (i + 1) * heads][:, :, positions]
            if masks is not None:
                m = torch.nn.functional.interpolate(
                    masks[i : i + 1].float(), size=(side, side), mode="nearest"
                )
                p = p[:, m.reshape(-1) > 0.5]
            total = total + torch.linalg.vector_norm(p)
    return total


def train_concept_lora(
    unet,
    text_encoder,
    scheduler,
    prompts: list[str],
    concept: str,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    rank: int = 1,
    lr: float = 1e-4,
    steps: int = 50,
    weight_decay: float = 1e-2,
    clip: float = 1.0,
    batch_size: int = 1,
    use_pooler: bool = True,
    importance_sampling: bool = True,
    seed: int = 0,
) -> LoRA:
    """Train one concept's LoRA on ``unet`` (not modified) with the attention loss above.

    Args:
      unet: the (refined) UNet the LoRA is trained on. text_encoder, scheduler: its pipeline's.
      prompts: prompts containing ``concept`` (one drawn per step). concept: the erased phrase.
      images: ``(n, C, H, W)`` images of the concept, in the UNet's input space.
      masks: ``(n, 1, H', W')`` concept masks in [0, 1] or None (every pixel).
      rank: LoRA rank >= 1. lr, steps, weight_decay, clip, batch_size: AdamW.
      use_pooler: also suppress attention on the end-of-text token.
      importance_sampling: MACE's timestep distribution (else uniform). seed: every draw.

    Returns:
      :class:`LoRA` over every ``attn2.to_k`` / ``attn2.to_v``.

    Raises:
      ValueError: rank < 1, masks that do not match the images, or a concept absent from a prompt.
    """
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}.")
    if masks is not None and masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"{masks.shape[0]} masks for {images.shape[0]} images of {concept!r}; give one each."
        )
    import copy

    model = copy.deepcopy(unet).eval().requires_grad_(False)
    ref = next(model.parameters())
    records: list = []
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            module.set_processor(_Recorder(lambda n, p: records.append((n, p)), name))
    gen = torch.Generator().manual_seed(seed)
    factors, params = {}, []
    for name, module in model.named_modules():
        if KV_PATTERN.search(name):
            d_out, d_in = module.weight.shape
            a = (torch.randn(rank, d_in, generator=gen) / rank).to(ref).requires_grad_(True)
            b = torch.zeros(d_out, rank).to(ref).requires_grad_(True)
            factors[name] = (a, b)
            params += [a, b]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    embeds = text_encoder.encode_prompts(list(prompts)).to(ref)
    where = [
        concept_positions(text_encoder.tokenizer, p, concept, use_pooler=use_pooler)
        for p in prompts
    ]
    weights = importance_weights(scheduler.config.num_train_timesteps)
    base = {f"{n}.weight": model.get_submodule(n).weight for n in factors}
    for _ in range(steps):
        which = int(torch.randint(0, len(prompts), (1,), generator=gen))
        rows = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        if importance_sampling:
            t = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        else:
            t = torch.randint(0, weights.numel(), (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *images.shape[1:]), generator=gen).to(ref)
        xt = scheduler.add_noise(images[rows].to(ref), noise, t)
        lora = {
            k: w + factors[k[: -len(".weight")]][1] @ factors[k[: -len(".weight")]][0]
            for k, w in base.items()
        }
        records.clear()
        functional_call(
            model,
            lora,
            (xt, t.to(ref.device)),
            {"encoder_hidden_states": embeds[which : which + 1].expand(batch_size, -1, -1)},
        )
        loss = _attention_loss(
            records, where[which], None if masks is None else masks[rows], batch_size
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    records.clear()
    return LoRA({n: (a.detach(), b.detach()) for n, (a, b) in factors.items()})
