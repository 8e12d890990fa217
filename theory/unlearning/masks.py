"""Parameter masks: which entries of theta an unlearning method may move (theory.md s.3).

A :class:`Mask` maps (theta_0, forget gradient) to a 0/1 array of theta's shape and a start point.
Entries outside the mask stay at the start point; the solver moves only the masked ones. The forget
gradient is that of the method's own forget term at theta_0 (in the exact model the plain diffusion
loss on forget data has zero gradient at theta_0 when p_null = 0, so SalUn's "gradient of the
forgetting loss" is read as the gradient of the unlearning objective's forget term).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from theory import _checks

__all__ = [
    "Mask",
    "MASKS",
    "v_only",
    "all_params",
    "saliency",
    "reset_repair",
    "get_mask",
    "top_fraction",
]


@dataclasses.dataclass(frozen=True)
class Mask:
    """A parameter mask.

    Attributes:
      name: registry name.
      select: ``(theta_0 (L,d,n), forget_grad (L,d,n), dim) -> (mask (L,d,n) in {0,1}, start (L,d,n))``.
    """

    name: str
    select: Callable


def top_fraction(score: jax.Array, fraction: float) -> jax.Array:
    """1.0 on the ceil(fraction * size) largest entries of ``score`` (ties included), else 0.0."""
    flat = jnp.sort(score.reshape(-1))
    k = max(1, math.ceil(fraction * flat.shape[0]))
    return (score >= flat[flat.shape[0] - k]).astype(score.dtype)


def _check_fraction(q) -> float:
    return _checks.finite_float("q", q, low=0.0, high=1.0, low_open=True)


def v_only() -> Mask:
    """Only the conditioning pathway V_t moves (cross-attention K/V edits: ESD-x, UCE, MACE)."""

    def select(theta_0, forget_grad, dim):
        mask = jnp.zeros_like(theta_0).at[..., dim:].set(1.0)
        return mask, theta_0

    return Mask("v_only", select)


def all_params() -> Mask:
    """Every entry of theta moves (ESD-u: the whole denoiser)."""
    return Mask("all", lambda theta_0, forget_grad, dim: (jnp.ones_like(theta_0), theta_0))


def saliency(q=0.5) -> Mask:
    """The top-q fraction of entries by |grad L_forget(theta_0)| (SalUn's weight saliency).

    Raises:
      ValueError: q outside (0, 1].
    """
    q = _check_fraction(q)
    return Mask(
        "saliency",
        lambda theta_0, forget_grad, dim: (top_fraction(jnp.abs(forget_grad), q), theta_0),
    )


def reset_repair(q=0.1, reset_value=0.0) -> Mask:
    """Reset the top-q entries by connection sensitivity |theta_0 * grad L_forget| to
    ``reset_value``, then let the solver repair only those entries (Scissorhands' trim + repair).

    Raises:
      ValueError: q outside (0, 1] or a non-finite reset value.
    """
    q = _check_fraction(q)
    value = _checks.finite_float("reset_value", reset_value)

    def select(theta_0, forget_grad, dim):
        mask = top_fraction(jnp.abs(theta_0 * forget_grad), q)
        return mask, jnp.where(mask > 0, value, theta_0)

    return Mask("reset_repair", select)


MASKS: dict[str, Callable[..., Mask]] = {
    "v_only": v_only,
    "all": all_params,
    "saliency": saliency,
    "reset_repair": reset_repair,
}


def get_mask(name: str, **kwargs) -> Mask:
    """Build a mask from its registry name.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    return _checks.registry_lookup("mask", name, MASKS)(**kwargs)
