"""Local Stable Diffusion folders: the prompt encoder and the pipeline parts the bridge uses.

The SD layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) is read from a local
directory only (style.md s.12: ``local_files_only=True``, errors name the missing file). The same
code reads a real SD checkpoint and a tiny one written by :func:`bridge.tiny.save_tiny_pipeline`;
UNet weights in other layouts (state dicts, CompVis keys) are :mod:`bridge.loading`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SDPipeline", "TextEncoder", "load_pipeline", "load_text_encoder"]


@dataclass
class TextEncoder:
    """A tokenizer and a CLIP text model that turn prompts into UNet conditioning.

    Attributes:
      tokenizer: word-level tiny tokenizer or a real SD ``CLIPTokenizer``.
      model: ``CLIPTextModel``; its hidden size is the UNet's ``cross_attention_dim``.
    """

    tokenizer: Any
    model: Any

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts as SD does (last hidden state, padded to the fixed context length).

        Args:
          prompts: B strings; the empty string is the null (unconditional) prompt.

        Returns:
          Tensor ``(B, seq, dim)`` on the model's device and dtype.

        Raises:
          ValueError: if ``prompts`` is empty or not a list of strings.
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.model.parameters()).device
        return self.model(ids.to(device)).last_hidden_state


@dataclass
class SDPipeline:
    """The parts of an SD folder the bridge uses. ``text_encoder``/``scheduler`` may be None."""

    unet: Any
    text_encoder: TextEncoder | None
    scheduler: Any


def load_text_encoder(folder, *, device: str | torch.device = "cpu", dtype=None) -> TextEncoder:
    """Load ``tokenizer/`` + ``text_encoder/`` of a local SD or tiny folder (no downloads).

    A real SD ``tokenizer/`` (``vocab.json`` + ``merges.txt``) is read with ``CLIPTokenizer``; a
    tiny word-level one (only ``tokenizer.json``) with ``PreTrainedTokenizerFast``. Offline
    transformers can return a broken CLIP tokenizer without raising, so the vocabulary size and
    the encoding of a probe word are checked.

    Args:
      folder: pipeline folder containing ``tokenizer/`` and ``text_encoder/``.
      device: torch device for the text model. dtype: optional torch dtype for it.

    Returns:
      :class:`TextEncoder`.

    Raises:
      FileNotFoundError: if a sub-folder or its files are missing (names the path).
      ValueError: if the tokenizer loads but is broken (vocabulary too small or all-unknown).
    """
    from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    tok_dir, enc_dir = folder / "tokenizer", folder / "text_encoder"
    for sub, needed in ((tok_dir, None), (enc_dir, "config.json")):
        if not sub.is_dir():
            raise FileNotFoundError(f"no `{sub.name}/` folder in {folder} (expected an SD layout)")
        if needed and not (sub / needed).is_file():
            raise FileNotFoundError(f"missing {needed} in {sub}")
    if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        min_vocab = 1000  # SD's CLIP BPE has 49,408 entries; a broken offline load has a handful
        probe_word = "photo"  # a broken BPE load maps even common words to <unk>
    elif (tok_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)
        from bridge.tiny import SPECIAL_TOKENS  # lazily: bridge.tiny imports this module

        min_vocab = len(SPECIAL_TOKENS) + 1
        probe_word = None  # a word-level vocabulary is whatever the testbed chose
    else:
        raise FileNotFoundError(
            f"tokenizer files missing in {tok_dir}: need vocab.json + merges.txt (CLIP BPE) "
            "or tokenizer.json (word-level)"
        )
    if len(tokenizer) < min_vocab:
        raise ValueError(
            f"tokenizer in {tok_dir} loaded with only {len(tokenizer)} entries (< {min_vocab}); "
            "the vocabulary files are probably incomplete"
        )
    probe = tokenizer(probe_word, add_special_tokens=False).input_ids if probe_word else [0]
    if not probe or (probe_word and all(i == tokenizer.unk_token_id for i in probe)):
        raise ValueError(f"tokenizer in {tok_dir} maps the probe word {probe_word!r} to <unk> only")
    model = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    return TextEncoder(tokenizer=tokenizer, model=model)


def load_pipeline(folder, *, device: str | torch.device = "cpu", dtype=None) -> SDPipeline:
    """Load the parts of a local SD folder the bridge uses (real SD, or what
    :func:`bridge.tiny.save_tiny_pipeline` wrote).

    Args:
      folder: pipeline folder. device, dtype: where to put the UNet and text encoder.

    Returns:
      :class:`SDPipeline` (``text_encoder`` None when the folder has no ``text_encoder/``).

    Raises:
      FileNotFoundError / ValueError: from :func:`bridge.loading.load_unet` or
        :func:`load_text_encoder`.
    """
    import diffusers

    from bridge.loading import load_unet

    folder = Path(folder)
    unet = load_unet(folder, device=device, dtype=dtype)
    text = None
    if (folder / "text_encoder").is_dir():
        text = load_text_encoder(folder, device=device, dtype=dtype)
    sched_dir = folder / "scheduler"
    scheduler = None
    if (sched_dir / "scheduler_config.json").is_file():
        name = json.loads((sched_dir / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, name).from_pretrained(str(sched_dir))
    return SDPipeline(unet=unet, text_encoder=text, scheduler=scheduler)
