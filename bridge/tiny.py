"""Tiny diffusers models built from configs: a UNet, a CLIP text encoder and a word-level tokenizer.

Nothing here downloads anything. The tiny UNet follows the diffusers test recipe (two resolution
levels, one layer per block, cross-attention in the first down / last up block as in SD), so the
whole bridge can run and be tested on CPU in seconds. ``save_tiny_pipeline`` writes the Stable
Diffusion folder layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
:mod:`bridge.sd` and :mod:`bridge.loading` read back, so tiny and real checkpoints go through the
same code (loading lives there, not here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bridge.sd import TextEncoder  # the prompt encoder the tiny models are wrapped in
from theory._atomic import atomic_write_json

__all__ = [
    "DEFAULT_VOCAB",
    "SPECIAL_TOKENS",
    "TextEncoder",
    "build_tiny_text_encoder",
    "build_tiny_unet",
    "build_word_tokenizer",
    "save_tiny_pipeline",
    "tiny_scheduler",
    "tiny_unet_config",
]

#: Special tokens of the word-level tokenizer, in id order (pad=0, unk=1, bos=2, eos=3).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

#: A small default vocabulary: art styles, objects, and the usual unlearning targets.
DEFAULT_VOCAB = tuple(
    "a an the of in on with by and photo picture painting drawing image style portrait landscape "
    "cat dog car tree house church parachute fish truck golf ball chainsaw horn garbage "
    "van gogh monet picasso nude naked person man woman child city sea mountain sky red blue "
    "green yellow black white small large old new".split()
)


def tiny_unet_config(
    sample_size: int = 16,
    *,
    in_channels: int = 4,
    block_out_channels: tuple[int, ...] = (8, 16),
    cross_attention_dim: int = 16,
    attention_head_dim: int = 2,
    norm_num_groups: int = 4,
    layers_per_block: int = 1,
) -> dict[str, Any]:
    """Config dict of a tiny ``UNet2DConditionModel`` (diffusers test recipe, SD block layout).

    Args:
      sample_size: latent height = width, in pixels of the latent grid.
      in_channels: latent channels (also the output channels; 4 as in SD, 3 for RGB "latents").
      block_out_channels: channels per resolution level.
      cross_attention_dim: width of the text embeddings (= the text encoder's hidden size).
      attention_head_dim: diffusers' ``attention_head_dim`` (in practice the number of heads).
      norm_num_groups: group-norm groups; must divide every entry of ``block_out_channels``.
      layers_per_block: resnet (+ attention) layers per block.

    Returns:
      Keyword arguments for ``UNet2DConditionModel(**config)`` with lists, not tuples, so the
      dict round-trips through JSON unchanged.
    """
    levels = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "layers_per_block": layers_per_block,
        "block_out_channels": list(block_out_channels),
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": norm_num_groups,
    }


def build_tiny_unet(seed: int = 0, **overrides: Any):
    """Build a randomly initialised tiny ``UNet2DConditionModel`` in eval mode.

    Args:
      seed: torch seed for the initial weights (same seed -> identical weights).
      **overrides: keyword arguments of :func:`tiny_unet_config`, or any other
        ``UNet2DConditionModel`` argument, which replaces the config entry.

    Returns:
      The UNet (float32, eval mode).
    """
    from diffusers import UNet2DConditionModel

    cfg_keys = tiny_unet_config.__code__.co_varnames[: tiny_unet_config.__code__.co_argcount]
    cfg_keys = set(cfg_keys) | set(tiny_unet_config.__kwdefaults__ or {})
    cfg = tiny_unet_config(**{k: v for k, v in overrides.items() if k in cfg_keys})
    cfg.update({k: v for k, v in overrides.items() if k not in cfg_keys})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg)
    return unet.eval()


def build_word_tokenizer(vocab=DEFAULT_VOCAB, *, max_length: int = 8):
    """Word-level tokenizer (lower-cased, whitespace/punctuation split), a transformers fast one.

    Prompts become ``<bos> w1 ... wn <eos> <pad> ...`` of exactly ``max_length`` ids (truncated
    if longer), like CLIP's fixed 77-token context. Unknown words map to ``<unk>``.

    Args:
      vocab: words of the vocabulary (special tokens are added in front, duplicates dropped).
      max_length: fixed sequence length, including ``<bos>`` and ``<eos>``.

    Returns:
      ``transformers.PreTrainedTokenizerFast`` (saves/loads with ``save_pretrained`` /
      ``from_pretrained``).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + [w.lower() for w in vocab if w.lower() not in SPECIAL_TOKENS]
    ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def build_tiny_text_encoder(
    tokenizer, *, hidden_size: int = 16, seed: int = 0, num_layers: int = 2, num_heads: int = 2
):
    """Randomly initialised ``transformers.CLIPTextModel`` sized for ``tokenizer``.

    Args:
      tokenizer: tokenizer whose vocabulary size and ``model_max_length`` fix the embedding tables.
      hidden_size: width of the token embeddings; must equal the UNet's ``cross_attention_dim``.
      seed: torch seed for the initial weights.
      num_layers: transformer layers. num_heads: attention heads (must divide ``hidden_size``).

    Returns:
      ``CLIPTextModel`` in eval mode (float32).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(cfg)
    return model.eval()


def tiny_scheduler(kind: str = "ddpm"):
    """SD's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps) as a scheduler.

    Args:
      kind: ``"ddpm"`` or ``"ddim"``.

    Returns:
      ``DDPMScheduler`` or ``DDIMScheduler``.

    Raises:
      ValueError: for another ``kind``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    kinds = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in kinds:
        raise ValueError(f"`kind` must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind](
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def save_tiny_pipeline(folder, unet, text_encoder=None, tokenizer=None, scheduler=None) -> Path:
    """Write an SD-style folder: ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.

    Args:
      folder: destination (created if missing).
      unet: ``UNet2DConditionModel``.
      text_encoder: ``CLIPTextModel`` or :class:`TextEncoder` (then ``tokenizer`` may be omitted).
      tokenizer: tokenizer to save beside the text encoder.
      scheduler: scheduler to save; defaults to :func:`tiny_scheduler` ``("ddpm")``.

    Returns:
      The folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(text_encoder, TextEncoder):
        tokenizer = tokenizer or text_encoder.tokenizer
        text_encoder = text_encoder.model
    unet.save_pretrained(folder / "unet")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    if text_encoder is not None:
        text_encoder.save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "tokenizer")
        index["tokenizer"] = ["transformers", type(tokenizer).__name__]
    scheduler = scheduler if scheduler is not None else tiny_scheduler("ddpm")
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    atomic_write_json(folder / "model_index.json", index)
    return folder
