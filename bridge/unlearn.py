"""Moved to :mod:`bridge.unlearning` (one module per method); the old names still import here.

``from bridge.unlearn import apply_uce, esd, ...`` keeps working for existing callers.
"""

from bridge.unlearning.esd import ESD_MASKS, esd, esd_target
from bridge.unlearning.uce import (
    UCE_EDITS,
    UCEConcepts,
    apply_uce,
    uce_closed_form,
    uce_token_embeddings,
)

__all__ = [
    "ESD_MASKS",
    "UCE_EDITS",
    "UCEConcepts",
    "apply_uce",
    "esd",
    "esd_target",
    "uce_closed_form",
    "uce_token_embeddings",
]
