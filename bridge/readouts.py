r"""Readouts of resurgence on a UNet: values at any theta, gradients at theta_u (pipeline step 3).

The law of theory.md s.4b predicts the change of ANY differentiable readout R under GD from its
gradient at theta_u, :math:`\Delta R(T) = -\sum_i a_i(T) \langle g, v_i\rangle
\langle v_i, \nabla R(\theta_u)\rangle`. The names are those of ``theory.readouts``:

* ``rho``: :math:`-\langle\theta - \theta_u, \delta\rangle / \|\delta\|^2` (linear: exact);
* ``output_rho``: :math:`\langle \epsilon_\theta - \epsilon_u, \epsilon_0 - \epsilon_u\rangle /
  \|\epsilon_0 - \epsilon_u\|^2` on the frozen (x_t, t, c_f) of the forget probes; its gradient
  is one vector-Jacobian product per batch with cotangent :math:`\epsilon_0 - \epsilon_u`;
* ``forget_loss_recovery``: :math:`(L_f(\theta_u) - L_f(\theta)) / (L_f(\theta_u) -
  L_f(\theta_0))`, L_f the denoising loss with target eps on the forget probes (the one
  definition: :func:`bridge.subspaces.forget_loss_recovery`);
* ``presence``: mean classifier probability of the erased concept on DDIM samples of the erased
  prompt from fixed x_T seeds, and ``presence_logprob``: the mean log-probability (nats);
  both are differentiated through the sampler (:mod:`bridge.sampler`).

Every readout is a function of the group's flat vector on the *unlearned* UNet (theta_0 enters
only through the group), so the group must cover every tensor the method edited
(:func:`bridge.hygiene.check_group_covers_edit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.func import functional_call

from bridge.groups import ParameterGroup
from bridge.loss import FrozenDiffusionLoss, frozen_params
from bridge.probes import Probes
from bridge.sampler import presence_scores, sample_at
from bridge.subspaces import forget_loss_recovery

__all__ = ["READOUT_NAMES", "ReadoutGradients", "ReadoutSet"]

ReadoutName = Literal["rho", "output_rho", "forget_loss_recovery", "presence", "presence_logprob"]
#: Readouts the bridge measures and predicts (``presence*`` need a sampler and a classifier).
READOUT_NAMES: tuple[str, ...] = ReadoutName.__args__
_PRESENCE = ("presence", "presence_logprob")


@dataclass(frozen=True)
class ReadoutGradients:
    """Readouts at theta_u and their gradients over the group: what ``bridge.predict`` consumes.

    Attributes:
      names: readout names, in order.
      values: ``(N,)`` R(theta_u) (0 for rho, output_rho, forget_loss_recovery; presence in
        probability, presence_logprob in nats).
      gradients: ``(N, n)`` float64, grad R(theta_u) per readout.
      group_spec: the parameter group.
      seeds: the sampler's x_T seeds (empty without presence): prediction and measurement must
        use the same.
    """

    names: tuple[str, ...]
    values: np.ndarray
    gradients: np.ndarray
    group_spec: str
    seeds: tuple[int, ...] = ()

    def gradient(self, name: str) -> np.ndarray:
        """grad R(theta_u) of readout ``name``, ``(n,)``."""
        return self.gradients[self.names.index(name)]


class ReadoutSet:
    """The readouts of one (theta_0, theta_u, group, probes), evaluated at any group vector.

    Args:
      base: UNet at theta_0 (only its group values are read).
      unlearned: UNet at theta_u (eval mode; not modified).
      group: the fine-tuned and measured parameter group.
      probes: :class:`bridge.probes.Probes` (forget batches; the sampler for presence).
      log_probs: classifier hook ``images -> (m, K)`` log-probabilities, differentiable; with
        ``concept`` (its class index) it enables ``presence`` and ``presence_logprob``.
      checkpoint: gradient checkpointing through the sampler (SD-size UNets).
      sample_chunk: seeds per sampler call (None = all at once).

    Raises:
      ValueError: delta = theta_u - theta_0 zero over the group; presence asked without a
        sampler; a zero forget-loss or output normaliser (each one line, naming it).
    """

    def __init__(
        self,
        base,
        unlearned,
        group: ParameterGroup,
        probes: Probes,
        *,
        log_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
        concept: int | None = None,
        checkpoint: bool = False,
        sample_chunk: int | None = None,
    ):
        self.unet = unlearned.eval()
        self.group = group
        self.probes = probes
        self.forget = FrozenDiffusionLoss(unlearned, group, probes.forget)
        self.theta_u = self.forget.theta()
        self.theta_0 = group.values(base).to(self.theta_u)
        self.delta = self.theta_u - self.theta_0
        self.delta_sq = float(self.delta.double() @ self.delta.double())
        if self.delta_sq == 0.0:
            raise ValueError(
                f"delta = theta_u - theta_0 is zero over group {group.spec!r}: no readout is "
                "defined."
            )
        if (log_probs is None) != (concept is None):
            raise ValueError("give both `log_probs` and `concept` (presence) or neither.")
        if log_probs is not None and probes.sampler is None:
            raise ValueError("presence needs `probes.sampler` (the erased prompt's DDIM seeds).")
        self.log_probs, self.concept = log_probs, concept
        self.checkpoint, self.sample_chunk = checkpoint, sample_chunk
        self.names = READOUT_NAMES if log_probs is not None else READOUT_NAMES[:3]
        with torch.no_grad():
            self._eps_u = [self._outputs(self.theta_u, i) for i in range(len(probes.forget))]
            removed = [self._outputs(self.theta_0, i) - e for i, e in enumerate(self._eps_u)]
        self._removed = removed
        self._removed_sq = float(sum((r.double() ** 2).sum() for r in removed))
        if self._removed_sq == 0.0:
            raise ValueError(
                "`output_rho` is undefined: eps_0 = eps_u on every forget probe (the edit changes "
                f"no output of the erased prompt through group {group.spec!r})."
            )
        self.loss_u = self.forget.value(self.theta_u)
        self.loss_0 = self.forget.value(self.theta_0)
        forget_loss_recovery(self.loss_u, self.loss_u, self.loss_0)  # raises on a zero denominator

    # -- values ---------------------------------------------------------------------------------
    def _outputs(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        b = self.forget.batches[index]
        return functional_call(
            self.unet,
            self.group.unflatten(flat),
            (b.noisy, b.timesteps),
            {"encoder_hidden_states": b.cond},
        ).sample

    def _output_rho(self, flat: torch.Tensor) -> torch.Tensor:
        total = sum(
            ((self._outputs(flat, i) - e) * r).sum()
            for i, (e, r) in enumerate(zip(self._eps_u, self._removed, strict=True))
        )
        return total / self._removed_sq

    def _presence(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean probability, mean log-probability) over the sampler's seeds."""
        n = len(self.probes.sampler.seeds)
        chunk = self.sample_chunk or n
        prob, logp = 0.0, 0.0
        for start in range(0, n, chunk):
            images = sample_at(
                self.unet,
                self.group,
                flat,
                self.probes.sampler,
                seeds=slice(start, start + chunk),
                checkpoint=self.checkpoint,
            )
            scores = presence_scores(self.log_probs, images, self.concept)
            prob = prob + scores.exp().sum() / n
            logp = logp + scores.sum() / n
        return prob, logp

    def values(self, flat: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, float]:
        """R(flat) for each readout in ``names`` (default all), without autograd."""
        names = self.names if names is None else tuple(names)
        self._check_names(names)
        flat = flat.detach().to(self.theta_u)
        out: dict[str, float] = {}
        with torch.no_grad(), frozen_params(self.unet):
            if "rho" in names:
                step = (flat - self.theta_u).double()
                out["rho"] = float(-(step @ self.delta.double()) / self.delta_sq)
            if "output_rho" in names:
                out["output_rho"] = float(self._output_rho(flat))
            if "forget_loss_recovery" in names:
                out["forget_loss_recovery"] = forget_loss_recovery(
                    self.loss_u, self.forget.value(flat), self.loss_0
                )
            if any(n in names for n in _PRESENCE):
                prob, logp = self._presence(flat)
                out.update({"presence": float(prob), "presence_logprob": float(logp)})
        return {n: out[n] for n in names}

    # -- gradients ------------------------------------------------------------------------------
    def gradients(self, names: Sequence[str] | None = None) -> ReadoutGradients:
        """grad R(theta_u) of each readout (VJPs; one backward through the sampler for presence).

        Raises:
          ValueError: a readout whose gradient is zero over the group (it does not depend on the
            fine-tuned parameters), naming it.
        """
        return self.gradients_at(self.theta_u, names)

    def gradients_at(
        self, flat: torch.Tensor, names: Sequence[str] | None = None
    ) -> ReadoutGradients:
        """R and grad R at any group vector ``flat`` ``(n,)``: the same readouts (still defined
        against theta_0 and theta_u) away from theta_u, e.g. along a fine-tuning run (the guard).

        The presence values come from the pass that differentiates them (one sampling, not two).

        Raises:
          ValueError: a readout whose gradient is zero over the group, naming it.
        """
        names = self.names if names is None else tuple(names)
        self._check_names(names)
        flat = flat.detach().to(self.theta_u)
        wanted = [n for n in _PRESENCE if n in names]
        values = self.values(flat, [n for n in names if n not in _PRESENCE])
        grads: dict[str, torch.Tensor] = {}
        if "rho" in names:
            grads["rho"] = -self.delta / self.delta_sq
        with frozen_params(self.unet):
            if "output_rho" in names:
                grads["output_rho"] = torch.func.grad(self._output_rho)(flat)
            if "forget_loss_recovery" in names:
                grads["forget_loss_recovery"] = -self.forget.gradient(flat) / (
                    self.loss_u - self.loss_0
                )
            if wanted:
                leaf = flat.clone().requires_grad_(True)
                with torch.enable_grad():
                    prob, logp = self._presence(leaf)
                    outputs = {"presence": prob, "presence_logprob": logp}
                    for i, name in enumerate(wanted):
                        out = outputs[name]
                        values[name] = float(out.detach())
                        (g,) = (
                            torch.autograd.grad(
                                out, leaf, retain_graph=i < len(wanted) - 1, allow_unused=True
                            )
                            if out.requires_grad
                            else (None,)
                        )
                        grads[name] = torch.zeros_like(leaf) if g is None else g
        stacked = np.stack([grads[n].detach().cpu().double().numpy() for n in names])
        for name, g in zip(names, stacked, strict=True):
            if not np.any(g):
                raise ValueError(
                    f"readout `{name}` has zero gradient over group {self.group.spec!r}: it does "
                    "not depend on the fine-tuned parameters; fine-tune a group it depends on."
                )
        seeds = self.probes.sampler.seeds if self.probes.sampler is not None else ()
        return ReadoutGradients(
            names, np.array([values[n] for n in names]), stacked, self.group.spec, tuple(seeds)
        )

    def _check_names(self, names: Sequence[str]) -> None:
        bad = [n for n in names if n not in self.names]
        if bad:
            extra = "" if self.log_probs is not None else " (presence needs `log_probs`, `concept`)"
            raise ValueError(f"unknown readouts {bad}; available: {list(self.names)}{extra}.")
