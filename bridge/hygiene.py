"""Comparison hygiene: the measured group must be the group the unlearning method edited.

A prediction over parameter group G compares theta_u with theta_0 on G only, and the readouts
(:mod:`bridge.readouts`) put theta_0 back on G alone. If the method edited tensors outside G, the
"fully undone" point of every readout is not the base model; if it edited nothing in G, there is
nothing to predict (ESD-u edits no cross-attention K/V: delta over K/V is zero). Both are refused
here with one line that names the group and what the method edits
(:data:`bridge.unlearning.names.METHOD_TABLE`).
"""

from __future__ import annotations

import torch

from bridge.groups import ParameterGroup, select_group

__all__ = ["check_group_covers_edit", "edited_tensors", "method_group"]


def method_group(method: str) -> str:
    """The :data:`bridge.groups.PRESETS` group covering every tensor ``method`` edits.

    >>> method_group("esd-x")
    'cross-attn'

    Raises:
      ValueError: an unknown method (the message lists the valid names).
    """
    from bridge.unlearning.names import METHOD_TABLE, resolve_method_name

    name = resolve_method_name(method).name
    return next(m.group for m in METHOD_TABLE if m.name == name)


def _method_edits(method: str | None) -> str:
    if method is None:
        return ""
    from bridge.unlearning.names import METHOD_TABLE, resolve_method_name

    name = resolve_method_name(method).name
    info = next(m for m in METHOD_TABLE if m.name == name)
    return f"; {name} edits {info.edits} (group {info.group!r})"


def edited_tensors(base, unlearned) -> list[str]:
    """Names of the parameters where ``unlearned`` differs from ``base`` (exact comparison)."""
    theirs = dict(unlearned.named_parameters())
    out = []
    for name, p in base.named_parameters():
        q = theirs[name].detach().to(p.device, p.dtype)
        if not torch.equal(p.detach(), q):
            out.append(name)
    return out


def check_group_covers_edit(
    base, unlearned, group: ParameterGroup | str, *, method: str | None = None
) -> ParameterGroup:
    """Refuse a measured group that misses the edit (one line, naming the group and the method).

    Args:
      base, unlearned: UNets at theta_0 and theta_u (same architecture).
      group: the measured (and fine-tuned) group, or its preset / regex.
      method: the unlearning method's name, for the message (e.g. ``"esd-u"``).

    Returns:
      The group.

    Raises:
      ValueError: delta is zero over the group, or the method edited tensors outside it.
    """
    group = select_group(base, group) if isinstance(group, str) else group
    edited = edited_tensors(base, unlearned)
    inside = set(group.names)
    if not any(n in inside for n in edited):
        raise ValueError(
            f"delta = theta_u - theta_0 is zero over group {group.spec!r} ({group.numel} "
            f"parameters){_method_edits(method)}: measure and fine-tune the group the method edits."
        )
    outside = [n for n in edited if n not in inside]
    if outside:
        raise ValueError(
            f"group {group.spec!r} misses {len(outside)} edited tensors (e.g. {outside[0]!r})"
            f"{_method_edits(method)}: the readouts would not reach theta_0; measure that group."
        )
    return group
