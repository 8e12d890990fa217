"""Method names shared with ``theory.unlearning`` and the method table of README and ``--help``.

One spelling everywhere: the names of :data:`theory.unlearning.METHOD_NAMES` (``esd_x``, not
``esd-x``), plus the bridge-only variant ``uce_v`` (UCE editing V only). This module imports
neither torch nor jax, so the command line can list the methods without loading either; a test
checks that :data:`METHOD_NAMES` equals the theory's tuple.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

__all__ = [
    "METHOD_NAMES",
    "METHOD_TABLE",
    "VARIANTS",
    "MethodInfo",
    "ResolvedName",
    "all_method_names",
    "method_table_markdown",
    "resolve_method_name",
]

#: The seven published methods (ESD in two variants), spelled and ordered as in theory.
METHOD_NAMES: tuple[str, ...] = (
    "uce",
    "esd_x",
    "esd_u",
    "sdd",
    "salun",
    "scissorhands",
    "erasediff",
    "mace",
)
#: Bridge-only variants of a method above (same method, another parameter mask).
VARIANTS: dict[str, str] = {"uce_v": "uce"}
#: Other spellings users type, mapped to the canonical name.
_ALIASES: dict[str, str] = {"shs": "scissorhands", "scissor_hands": "scissorhands"}


class MethodInfo(NamedTuple):
    """One row of the method table: what a method edits and where its defaults come from."""

    name: str
    edits: str
    group: str  # the bridge.groups preset covering every tensor the method changes
    defaults: str
    source: str


METHOD_TABLE: tuple[MethodInfo, ...] = (
    MethodInfo(
        "uce",
        "cross-attention to_k, to_v (closed form)",
        "cross-attn-kv",
        "lam 0.1, anchor = empty prompt, erase/preserve scale 1",
        "Gandikota et al. 2024, eq. 7; rohitgandikota/unified-concept-editing",
    ),
    MethodInfo(
        "uce_v",
        "cross-attention to_v only (closed form)",
        "cross-attn-v",
        "as uce",
        "bridge variant of uce (theory's V-only mask)",
    ),
    MethodInfo(
        "esd_x",
        "every cross-attention parameter (attn2)",
        "cross-attn",
        "Adam lr 1e-5, 200 steps (paper: 1000), negative guidance 1, start guidance 3, DDIM 20",
        "Gandikota et al. 2023; rohitgandikota/erasing train-esd.py ('xattn')",
    ),
    MethodInfo(
        "esd_u",
        "every parameter except attn2, time embedding, conv_out",
        "non-cross-attn",
        "as esd_x",
        "Gandikota et al. 2023; train-esd.py ('noxattn')",
    ),
    MethodInfo(
        "sdd",
        "every cross-attention parameter (attn2)",
        "cross-attn",
        "AdamW lr 1e-5 wd 1e-4, 500 warm-up, 1500 steps, EMA 0.999, clip 1, DDIM 50",
        "Kim et al. 2023; nannullna/safe-diffusion train_sdd.py",
    ),
    MethodInfo(
        "salun",
        "top 50% of all UNet entries by forget-gradient magnitude",
        "all",
        "threshold 0.5, mask guidance 7.5, alpha 0.5, Adam lr 1e-5, 5 epochs, batch 8",
        "Fan et al. 2024; OPTML-Group/Unlearn-Saliency SD/README.md, random_label.py",
    ),
    MethodInfo(
        "scissorhands",
        "reset: top 0.5% of entries by SNIP sensitivity abs(theta * grad); repair: all",
        "all",
        "sparsity 0.995, 10 SNIP batches, lam 0.1, Adam lr 1e-5, 5 epochs, batch 16",
        "Wu & Harandi 2024; JingWu321/Scissorhands SD/shs.py, train_shs.sh",
    ),
    MethodInfo(
        "erasediff",
        "every UNet parameter",
        "all",
        "lambda_bome 0.1, K_steps 2, Adam lr 1e-5, 5 epochs, batch 8",
        "Wu et al. 2024; JingWu321/EraseDiff sd/train_scripts/erasediff_cls.py",
    ),
    MethodInfo(
        "mace",
        "cross-attention to_k, to_v (closed form + rank-1 LoRAs fused in closed form)",
        "cross-attn-kv",
        "rank 1, AdamW lr 1e-4, 50 steps, train/fuse preserve scale 1e-4, preserve weight 5e4",
        "Lu et al. 2024; Shilin-LU/MACE configs/celebrity, src/cfr_utils.py",
    ),
)


def all_method_names() -> tuple[str, ...]:
    """Every name ``--method`` accepts, in table order (methods, then variants)."""
    return METHOD_NAMES + tuple(VARIANTS)


class ResolvedName(NamedTuple):
    """A canonical method name and, when the user spelled it otherwise, a one-line note."""

    name: str
    note: str | None


def resolve_method_name(name: str) -> ResolvedName:
    """Canonical spelling of ``name``: ``"esd-x"`` -> ``esd_x`` with a note saying so.

    >>> resolve_method_name("esd-x")
    ResolvedName(name='esd_x', note="method 'esd-x' is spelled 'esd_x' (the name theory uses); using esd_x.")

    Raises:
      ValueError: an unknown name; the message lists the closest names (difflib) and all valid ones.
    """
    valid = all_method_names()
    if name in valid:
        return ResolvedName(name, None)
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key in valid:
        note = f"method {name!r} is spelled {key!r} (the name theory uses); using {key}."
        return ResolvedName(key, note)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown unlearning method {name!r}; {hint}valid: {', '.join(valid)}.")


def method_table_markdown() -> str:
    """The method table as Markdown (README section "Unlearning methods on UNets")."""
    rows = [
        "| method | edits | group | defaults | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows += [
        f"| `{m.name}` | {m.edits} | `{m.group}` | {m.defaults} | {m.source} |"
        for m in METHOD_TABLE
    ]
    return "\n".join(rows)
