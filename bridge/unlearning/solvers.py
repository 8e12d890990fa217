r"""Solvers: the closed form for projection edits, and first-order loops for everything else.

- :func:`ridge`: the minimiser of a ridge regression on one projection matrix (UCE, MACE's
  refinement and LoRA fusion; theory's ``closed_form`` on the V-only mask):

  .. math:: W' = \Big(\lambda W_0 + s_e\sum_i v_i c_i^\top + s_p\sum_p u_p c_p^\top\Big)
                 \Big(\lambda I + s_e\sum_i c_i c_i^\top + s_p\sum_p c_p c_p^\top\Big)^{-1},

  i.e. :math:`\arg\min_W s_e\sum_i\|W c_i - v_i\|^2 + s_p\sum_p\|W c_p - u_p\|^2 +
  \lambda\|W - W_0\|_F^2` (kept outputs :math:`u_p = W_0 c_p` by default).
- :func:`adam`: Adam/AdamW for ``steps`` steps on :math:`w_f L_f + w_r L_r` over a
  :class:`~bridge.unlearning.masks.Selection` (entries outside an entry mask are pinned).
- :func:`bome`: EraseDiff's first-order bi-level scheme (BOME): per epoch, ``inner_steps`` steps
  on :math:`L_f` give :math:`\hat f = L_f(\theta^K)`; then the outer steps descend
  :math:`L_r(\theta) + \lambda\,(L_f(\theta) - \hat f)` from the epoch's start point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from bridge.unlearning.masks import Selection

__all__ = ["Objective", "Solver", "adam", "bome", "ridge"]


def ridge(
    weight: torch.Tensor,
    contexts: torch.Tensor,
    values: torch.Tensor,
    preserve: torch.Tensor | None = None,
    *,
    lam: float,
    preserve_values: torch.Tensor | None = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """Closed-form ridge edit of one projection (module docstring), computed in float64.

    Args:
      weight: W_0, ``(d_out, d_in)``.
      contexts: c_i as rows, ``(n, d_in)``. values: the wanted outputs v_i as rows, ``(n, d_out)``.
      preserve: c_p as rows, ``(n_p, d_in)``, or None.
      lam: lambda >= 0. erase_scale, preserve_scale: s_e, s_p.
      preserve_values: the outputs kept for c_p, ``(n_p, d_out)``; default W_0 c_p (MACE's fusion
        keeps the *original* model's outputs while the proximity term pulls to ``weight``).

    Returns:
      W' in ``weight``'s dtype and device.

    Raises:
      ValueError: mismatched shapes, or a singular system (lambda = 0 with too few directions).
    """
    d_out, d_in = weight.shape
    if contexts.ndim != 2 or contexts.shape[1] != d_in:
        raise ValueError(
            f"`contexts` must be (n, {d_in}) for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(contexts.shape)}."
        )
    if values.shape != (contexts.shape[0], d_out):
        raise ValueError(
            f"`values` must be ({contexts.shape[0]}, {d_out}) to match `contexts`, "
            f"got {tuple(values.shape)}."
        )
    w0 = weight.detach().double().cpu()
    c, v = contexts.detach().double().cpu(), values.detach().double().cpu()
    lhs = lam * w0 + erase_scale * v.T @ c
    gram = lam * torch.eye(d_in, dtype=torch.float64) + erase_scale * c.T @ c
    if preserve is not None and preserve.numel():
        p = preserve.detach().double().cpu()
        if p.ndim != 2 or p.shape[1] != d_in:
            raise ValueError(f"`preserve` must have {d_in} columns, got {tuple(p.shape)}.")
        kept = p @ w0.T if preserve_values is None else preserve_values.detach().double().cpu()
        if kept.shape != (p.shape[0], d_out):
            raise ValueError(
                f"`preserve_values` must be ({p.shape[0]}, {d_out}), got {tuple(kept.shape)}."
            )
        lhs = lhs + preserve_scale * kept.T @ p
        gram = gram + preserve_scale * p.T @ p
    try:  # W' gram = lhs  <=>  gram W'^T = lhs^T (gram is symmetric)
        solved = torch.linalg.solve(gram, lhs.T).T
    except RuntimeError as err:
        raise ValueError(
            f"the closed-form system is singular (lam={lam}); use lam > 0 or more preserve "
            f"prompts. ({err})"
        ) from err
    return solved.to(dtype=weight.dtype, device=weight.device)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The per-step losses of a fine-tuning method: ``w_f L_f + w_r L_r``.

    Attributes:
      forget: ``(model, gen) -> scalar`` on a fresh forget batch.
      retain: ``(model, gen) -> scalar`` on a fresh retain batch, or None.
      forget_weight, retain_weight: w_f, w_r >= 0.
    """

    forget: Callable
    retain: Callable | None = None
    forget_weight: float = 1.0
    retain_weight: float = 0.0

    def total(self, model, gen) -> torch.Tensor:
        loss = self.forget_weight * self.forget(model, gen)
        if self.retain is not None and self.retain_weight > 0:
            loss = loss + self.retain_weight * self.retain(model, gen)
        return loss


@dataclasses.dataclass(frozen=True)
class Solver:
    """``solve(model, selection, objective, gen, *, progress, desc, after_step) -> model`` (in place)."""

    name: str
    solve: Callable


class _Trainable:
    """The selected tensors of ``model`` made trainable; pins entries outside an entry mask."""

    def __init__(self, model, selection: Selection):
        model.requires_grad_(False)
        own = dict(model.named_parameters())
        self.params = [own[n].requires_grad_(True) for n in selection.names]
        self.masks = None
        if selection.entries is not None:
            self.masks = [selection.entries[n].to(own[n].device) for n in selection.names]
            self.start = [p.detach().clone() for p in self.params]

    def mask_grads(self) -> None:
        if self.masks is not None:
            for p, m in zip(self.params, self.masks, strict=True):
                if p.grad is not None:
                    p.grad.mul_(m)

    @torch.no_grad()
    def pin(self) -> None:
        if self.masks is not None:
            for p, m, s in zip(self.params, self.masks, self.start, strict=True):
                p.copy_(torch.where(m, p, s))


def _check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{what}: the unlearning loss is {float(loss.detach())} at step {step}; lower the "
            "learning rate."
        )


def adam(
    lr: float,
    steps: int,
    *,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    clip: float | None = None,
    warmup: int = 0,
) -> Solver:
    """Adam (``decoupled=True``: AdamW) for ``steps`` steps; linear warm-up over ``warmup`` steps.

    Raises:
      ValueError: lr <= 0 or steps < 1.
    """
    if not lr > 0 or steps < 1:
        raise ValueError(f"`lr` must be > 0 and `steps` >= 1, got lr={lr!r}, steps={steps!r}.")

    def solve(
        model,
        selection,
        objective: Objective,
        gen,
        *,
        progress=False,
        desc="unlearn",
        after_step=None,
    ):
        train = _Trainable(model, selection)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls(train.params, lr=lr, weight_decay=weight_decay)
        ramp = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        for step in tqdm(range(steps), desc=desc, disable=not progress):
            loss = objective.total(model, gen)
            _check_finite(loss, step, desc)
            opt.zero_grad()
            loss.backward()
            train.mask_grads()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(train.params, clip)
            opt.step()
            ramp.step()
            train.pin()
            if after_step is not None:
                after_step(step, model)
        model.requires_grad_(True)
        return model.eval()

    return Solver("adam", solve)


def bome(
    lr: float, epochs: int, inner_steps: int, lambda_bome: float, steps_per_epoch: int
) -> Solver:
    r"""EraseDiff's first-order bi-level solver (module docstring), Adam at ``lr`` for both levels.

    ``erasediff_cls.py`` shares one Adam between the inner and outer updates; here the inner
    problem has its own Adam (created each epoch) so that its moments do not leak into the outer
    update: BOME's algorithm has a plain inner descent.

    Raises:
      ValueError: lr <= 0, lambda_bome < 0, or a count < 1.
    """
    if not lr > 0 or lambda_bome < 0 or min(epochs, inner_steps, steps_per_epoch) < 1:
        raise ValueError(
            f"need lr > 0, lambda_bome >= 0 and counts >= 1; got lr={lr!r}, "
            f"lambda_bome={lambda_bome!r}, epochs={epochs}, inner_steps={inner_steps}, "
            f"steps_per_epoch={steps_per_epoch}."
        )

    def solve(
        model,
        selection,
        objective: Objective,
        gen,
        *,
        progress=False,
        desc="erasediff",
        after_step=None,
    ):
        if objective.retain is None:
            raise ValueError("EraseDiff's outer problem needs retain data (`objective.retain`).")
        train = _Trainable(model, selection)
        outer = torch.optim.Adam(train.params, lr=lr)
        step = 0
        for _ in tqdm(range(epochs), desc=desc, disable=not progress):
            start = [p.detach().clone() for p in train.params]
            inner = torch.optim.Adam(train.params, lr=lr)
            inner_losses = []
            for _ in range(inner_steps):  # theta_i -> theta_i^K on the forget term alone
                f = objective.forget(model, gen)
                _check_finite(f, step, desc)
                inner.zero_grad()
                f.backward()
                train.mask_grads()
                inner.step()
                train.pin()
                inner_losses.append(float(f.detach()))
            f_hat = sum(inner_losses) / len(inner_losses)
            with torch.no_grad():  # back to theta_i for the outer step
                for p, s in zip(train.params, start, strict=True):
                    p.copy_(s)
            for _ in range(steps_per_epoch):
                loss = objective.retain(model, gen) + lambda_bome * (
                    objective.forget(model, gen) - f_hat
                )
                _check_finite(loss, step, desc)
                outer.zero_grad()
                loss.backward()
                train.mask_grads()
                outer.step()
                train.pin()
                if after_step is not None:
                    after_step(step, model)
                step += 1
        model.requires_grad_(True)
        return model.eval()

    return Solver("bome", solve)
