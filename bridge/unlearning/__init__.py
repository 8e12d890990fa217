"""Concept unlearning on diffusers UNets, composed from parts (theory.md section 3).

Every method is target x mask x solver, as in :mod:`theory.unlearning`:

- :mod:`~bridge.unlearning.targets`: what the erased prompt's output is pulled towards
  (``relabel``, ``null``, ``negative_guidance``);
- :mod:`~bridge.unlearning.masks`: which entries move (``by_name`` sets, SalUn's ``saliency``,
  Scissorhands' ``reset_repair``);
- :mod:`~bridge.unlearning.solvers`: ``ridge`` (closed form), ``adam``, ``bome``;
- :func:`~bridge.unlearning.compose.compose` combines them; one module per method: ``uce``,
  ``esd``, ``sdd``, ``salun``, ``scissorhands``, ``erasediff``, ``mace``.

``unlearn(name, unet, text_encoder, scheduler, erase=[...])`` runs any of them by name (theory's
spelling, :data:`METHOD_NAMES`). Heavy modules load on first use; importing this package costs
nothing.
"""

from bridge.unlearning.names import (
    METHOD_NAMES,
    METHOD_TABLE,
    VARIANTS,
    all_method_names,
    method_table_markdown,
    resolve_method_name,
)

__all__ = [
    "METHOD_NAMES",
    "METHOD_TABLE",
    "VARIANTS",
    "all_method_names",
    "method_table_markdown",
    "resolve_method_name",
    "unlearn",
]


def unlearn(*args, **kwargs):
    """:func:`bridge.unlearning.run.unlearn` (imported on first call: it needs torch)."""
    from bridge.unlearning.run import unlearn as run

    return run(*args, **kwargs)
