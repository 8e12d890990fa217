"""Named parameter groups of a diffusers UNet, selected by name pattern.

A group is the set of parameters that curvature and subspaces are measured over (the block of
theta the theory calls V when it is the cross-attention K/V). Presets mirror what unlearning
methods edit (the ``group`` column of :data:`bridge.unlearning.names.METHOD_TABLE`): UCE/MACE
``cross-attn-kv``, UCE-V ``cross-attn-v``, ESD-x/SDD ``cross-attn``, ESD-u ``non-cross-attn``
(everything but ``attn2``, the time embedding and ``conv_out``), SalUn/SHS/EraseDiff ``all``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["PRESETS", "ParameterGroup", "select_group"]

#: Preset name -> regular expression over ``named_parameters()`` names.
PRESETS: dict[str, str] = {
    "cross-attn-kv": r"attn2\.to_[kv]\.",
    "cross-attn-v": r"attn2\.to_v\.",
    "cross-attn": r"attn2\.",
    "attn": r"\.attn[12]\.",
    "all": r".*",
    # ESD-u's "noxattn" set; a lookahead anchored at the start (select_group uses re.search)
    "non-cross-attn": r"^(?!.*attn2)(?!.*time_emb)(?!conv_out)",
}


@dataclass(frozen=True)
class ParameterGroup:
    """An ordered selection of UNet parameters, flattened in this order.

    Attributes:
      names: parameter names (``named_parameters()`` order).
      shapes: their shapes.
      spec: the preset name or pattern that selected them.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    spec: str

    @property
    def numel(self) -> int:
        """Number of scalar parameters n in the group (length of the flat vector)."""
        total = 0
        for s in self.shapes:
            total += int(torch.Size(s).numel())
        return total

    def sizes(self) -> list[int]:
        """Number of entries of each tensor, in order."""
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the group's tensors from ``tensors`` into a flat vector ``(n,)``."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector ``(n,)`` into a dict name -> tensor of the group's shapes.

        Raises:
          ValueError: if ``flat`` does not have ``numel`` entries.
        """
        if flat.ndim != 1 or flat.numel() != self.numel:
            raise ValueError(
                f"flat vector has shape {tuple(flat.shape)}, expected ({self.numel},) for group "
                f"{self.spec!r}"
            )
        parts = torch.split(flat, self.sizes())
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def values(self, module: torch.nn.Module) -> torch.Tensor:
        """Current parameters of ``module`` in this group as a detached flat vector ``(n,)``."""
        params = dict(module.named_parameters())
        return self.flatten({n: params[n].detach() for n in self.names})


def select_group(module: torch.nn.Module, spec: str) -> ParameterGroup:
    """Select a parameter group by preset name or by regular expression over parameter names.

    Args:
      module: the UNet.
      spec: a preset of :data:`PRESETS` (``cross-attn-kv``, ``cross-attn``, ``attn``, ``all``)
        or a regular expression searched in each parameter name (e.g.
        ``r"down_blocks\\.0\\..*attn2\\.to_[kv]"``).

    Returns:
      :class:`ParameterGroup` in ``named_parameters()`` order.

    Raises:
      ValueError: if the group is empty; the message lists the preset names.
    """
    pattern = re.compile(PRESETS.get(spec, spec))
    picked = [(n, tuple(p.shape)) for n, p in module.named_parameters() if pattern.search(n)]
    if not picked:
        raise ValueError(
            f"parameter group {spec!r} matches no parameter of {type(module).__name__}; "
            f"available presets: {', '.join(PRESETS)} (or a regular expression over names "
            f"such as {next(iter(dict(module.named_parameters())), '?')!r})"
        )
    names, shapes = zip(*picked, strict=True)
    return ParameterGroup(names=tuple(names), shapes=tuple(shapes), spec=spec)
