r"""Resurgence-safe fine-tuning: every update projected off a guard subspace (issue 13, item 2).

The readout law (theory.md s.4b) gives the first-order change of a readout R over one step as
:math:`\langle\nabla R(\theta), \Delta\theta\rangle`. A guard with orthonormal columns U replaces
each step's parameter change by

.. math:: \Delta\theta \leftarrow (I - U U^\top)\,\Delta\theta ,

so every readout whose gradient lies in span(U) has zero first-order change. The projected
quantity is the optimizer's final parameter change (after ``opt.step()``): for SGD that is
:math:`-\eta_k\,\nabla L` (the projected gradient, as in theory/guard.py); for AdamW it is the
preconditioned, weight-decayed step, whose projection (not the gradient's) is what keeps the
readouts' first-order change zero. The optimizer's moments still see the full gradient.

Guards (:data:`GUARDS`):

- ``forget-subspace`` (:func:`forget_subspace_guard`): the span of the forget readouts'
  gradients over the trained parameters (:class:`bridge.readouts.ReadoutSet`): with a
  classifier ``presence`` / ``presence_logprob`` (what resurgence is judged by), else
  ``output_rho`` (the denoiser's output on the erased prompt, and on each synonym given as its
  own probes) and ``forget_loss_recovery``;
  re-estimated at the current weights every ``refresh_every`` steps, optionally with fixed extra
  directions (e.g. the eigenvectors the audit attributes the resurgence to).
- ``retain-core`` (:func:`retain_core_guard`): a PGU-style baseline (projected-gradient
  unlearning for text-to-image models, arXiv 2604.21041, implemented from the paper's
  description; its code is not public): the "core gradient space" of the retained concepts,
  the top left-singular vectors of their per-batch loss gradients holding ``energy`` of the
  squared singular values (GPM's threshold rule; 0.97 as in :func:`theory.guard.retain_core_guard`).
  PGU projects the *unlearning* update off it; here it is applied to fine-tuning, for comparison.

**Restoration** (``restore=True``, the ``forget-subspace`` default): a projected step holds the
readouts to first order only, and over many large steps the second-order drift adds up (tiny
testbed, UCE, 40 GD steps at lr = 1/lambda_max: presence on the guard's own 128 seeds still rose
by 8-15% of plain fine-tuning's rise; with restoration by 0.1%). At each refresh the guard also
measures how far the readouts R_j have risen above their values at theta_u,
:math:`r_j = \max(R_j(\theta) - R_j(\theta_u), 0)` (every readout rises with resurgence; one
that fell is held, not pushed back up), and adds to that refresh's step the minimum-norm
correction in span(U), :math:`c = -G^{+} r` (G the restored readouts' gradients at theta, the
extra directions with target 0), which cancels r to first order: a Gauss-Newton retraction onto
the readouts' level set, so the drift no longer accumulates. With a classifier only ``presence``
(probability units, what resurgence is judged by) is restored; ``presence_logprob`` is held by the
projection alone, since pulling back its rise at presence ~1e-5 costs benign loss and no presence.

The guard reports the share of each update's norm it removed,
:math:`\|U U^\top \Delta\theta\| / \|\Delta\theta\|`, and raises :class:`GuardError` when that
exceeds :data:`FULL_REMOVAL` (nothing would be fine-tuned).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from bridge.groups import ParameterGroup
from bridge.loss import FrozenDiffusionLoss, ProbeBatch
from bridge.probes import Probes

__all__ = [
    "FULL_REMOVAL",
    "GUARDS",
    "ForgetReadouts",
    "GuardError",
    "GuardRows",
    "SubspaceGuard",
    "forget_subspace_guard",
    "orthonormal_basis",
    "retain_core_guard",
]

GuardName = Literal["forget-subspace", "retain-core"]
#: Guards by name (the CLI's ``--guard`` choices besides ``none``).
GUARDS: tuple[str, ...] = GuardName.__args__
#: A guard that removes more than this share of an update's norm leaves nothing to fine-tune.
FULL_REMOVAL = 1.0 - 1e-6
#: Singular values below this share of the largest are dropped (float64 round-off of a Gram-free
#: SVD is ~1e-15 relative; 1e-10 leaves a wide margin and keeps every real direction).
RANK_TOL = 1e-10


class GuardRows(NamedTuple):
    """What a guard's directions give at the current weights.

    Attributes:
      rows: ``(m, n)`` directions spanning the guard.
      offsets: ``(m,)`` how far each row's readout is above its target (R(theta) - R(theta_u),
        0 where it fell), or None when the rows are not readout gradients (nothing to restore).
      restored: ``(m,)`` bool, the rows whose offsets the restoring correction cancels (None:
        all); the others are held by the projection only.
    """

    rows: np.ndarray
    offsets: np.ndarray | None = None
    restored: np.ndarray | None = None


#: ``(model, group) -> rows (m, n)`` or :class:`GuardRows`; an object with a ``bind(model,
#: group)`` method is bound with the guard (to record its reference at theta_u).
Directions = Callable[[torch.nn.Module, ParameterGroup], "np.ndarray | GuardRows"]


class GuardError(ValueError):
    """The guard subspace removes (almost) the whole update: nothing would be fine-tuned."""


def orthonormal_basis(rows: np.ndarray, *, energy: float | None = None) -> np.ndarray:
    r"""Orthonormal columns ``(n, r)`` spanning the rows of ``rows`` ``(m, n)``.

    With ``energy``, only the top left-singular directions whose squared singular values before
    them hold less than ``energy`` of the total are kept (GPM's rule, as theory/guard.py).

    >>> u = orthonormal_basis(np.array([[3.0, 0.0], [6.0, 0.0]]))
    >>> u.shape, float(abs(u[0, 0]))
    ((2, 1), 1.0)
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.size == 0:
        return np.zeros((rows.shape[-1], 0))
    u, s, _ = np.linalg.svd(rows.T, full_matrices=False)
    keep = s > RANK_TOL * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
    if energy is not None:
        sq = s**2
        keep &= (np.cumsum(sq) - sq) < energy * sq.sum()
    return u[:, keep]


class SubspaceGuard:
    """Projects each fine-tuning step off span(U), U re-estimated every ``refresh_every`` steps.

    Args:
      name: one of :data:`GUARDS` (recorded in the checkpoint digest).
      directions: ``(model, group) -> (m, n)`` rows spanning the guard at the model's current
        weights over ``group`` (the trained parameters, flat in ``named_parameters`` order).
      refresh_every: steps between re-estimates (>= 1); the first is at step 0.
      extra: fixed extra directions ``(k, n)`` over the same group, always guarded.
      energy: energy threshold of the basis (``retain-core``), or None for the whole span.
      label: free text stored in :meth:`spec` (what the directions were built from).
      restore: also correct, once per refresh, the readouts' drift from their values at theta_u
        (needs :class:`GuardRows` with ``offsets``; see the module docstring).

    Raises:
      ValueError: ``refresh_every`` <= 0 or an unknown ``name`` (one line, naming it).
    """

    def __init__(
        self,
        name: str,
        directions: Directions,
        *,
        refresh_every: int = 10,
        extra: np.ndarray | None = None,
        energy: float | None = None,
        label: str = "",
        restore: bool = False,
    ):
        if name not in GUARDS:
            raise ValueError(f"`guard` must be one of {list(GUARDS)}, got {name!r}.")
        if int(refresh_every) != refresh_every or refresh_every <= 0:
            raise ValueError(
                f"`refresh_every` (--guard-refresh) must be an integer >= 1 steps, got "
                f"{refresh_every!r}."
            )
        self.name, self.directions, self.refresh_every = name, directions, int(refresh_every)
        self.extra = None if extra is None else np.atleast_2d(np.asarray(extra, np.float64))
        self.energy, self.label, self.restore = energy, label, bool(restore)
        self.basis: torch.Tensor | None = None  # (n, r) float64
        self.correction: torch.Tensor | None = None  # (n,) float64, added to the next step
        self.corrections: list[float] = []  # ||c|| / ||projected step|| at each restoring step
        self.refreshed_at: int | None = None
        self.model = self.group = None

    def spec(self) -> dict:
        """What the guard is, for the run's digest: a resumed run must use the same guard."""
        extra = None
        if self.extra is not None:
            extra = hashlib.sha256(np.ascontiguousarray(self.extra).tobytes()).hexdigest()[:16]
        return {
            "guard": self.name,
            "refresh_every": self.refresh_every,
            "energy": self.energy,
            "extra": extra,
            "label": self.label,
            "restore": self.restore,
        }

    def bind(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        """Attach to the model being trained and its trainable parameter ``names`` (in order)."""
        params = dict(model.named_parameters())
        shapes = tuple(tuple(params[n].shape) for n in names)
        self.model, self.group = model, ParameterGroup(tuple(names), shapes, "trainable")
        if self.extra is not None and self.extra.shape[1] != self.group.numel:
            raise ValueError(
                f"`extra` guard directions have {self.extra.shape[1]} entries, the trained "
                f"parameters {self.group.numel}: give them over the fine-tuned group."
            )
        if hasattr(self.directions, "bind"):
            self.directions.bind(model, self.group)

    def refresh(self) -> torch.Tensor:
        """Re-estimate U at the model's current weights; returns it ``(n, r)``."""
        got = self.directions(self.model, self.group)
        got = got if isinstance(got, GuardRows) else GuardRows(got)
        rows, offsets = np.asarray(got.rows, np.float64), None
        if self.restore and got.offsets is not None:
            offsets = np.asarray(got.offsets, np.float64)
            restored = np.ones(len(rows), bool) if got.restored is None else got.restored
        if self.extra is not None:
            rows = np.concatenate([rows, self.extra])
            if offsets is not None:  # fixed directions: no change along them (target 0)
                offsets = np.concatenate([offsets, np.zeros(len(self.extra))])
                restored = np.concatenate([restored, np.ones(len(self.extra), bool)])
        ref = next(self.model.parameters())
        basis = orthonormal_basis(rows, energy=self.energy)
        self.basis = torch.from_numpy(basis).to(ref.device)
        self.correction = None
        if offsets is not None and np.any(offsets[restored]):
            # minimum-norm c with rows @ c = -offsets over the restored rows (least squares where
            # they are dependent); the other rows constrain nothing: c may move those readouts
            c = np.linalg.lstsq(rows[restored], -offsets[restored], rcond=RANK_TOL)[0]
            self.correction = torch.from_numpy(c).to(ref.device)
        return self.basis

    def maybe_refresh(self, step: int) -> None:
        """Refresh before update ``step + 1`` if ``step`` is a multiple of ``refresh_every``."""
        if self.basis is None or step % self.refresh_every == 0:
            self.refresh()
            self.refreshed_at = step

    @torch.no_grad()
    def project_step(self, before: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     step: int) -> float:  # fmt: skip
        """Replace the step ``params - before`` by its projection off span(U), in place, plus the
        pending restoring correction (``restore``; applied once, at the step after a refresh).

        Returns:
          The share of the step's norm removed, in [0, 1] (0 for a zero step).

        Raises:
          GuardError: if more than :data:`FULL_REMOVAL` of the norm was removed.
        """
        delta = torch.cat([(p - b).reshape(-1) for p, b in zip(params, before, strict=True)])
        delta = delta.double()
        norm = float(delta.norm())
        removed = self.basis @ (self.basis.T @ delta)
        frac = min(1.0, float(removed.norm()) / norm) if norm > 0.0 else 0.0
        if frac > FULL_REMOVAL:
            raise GuardError(
                f"guard `{self.name}` removed {100 * frac:.6f}% of the update's norm at step "
                f"{step} (rank {self.basis.shape[1]} over {delta.numel()} trained parameters): "
                "nothing is left to fine-tune; guard fewer directions or train a larger group."
            )
        kept = delta - removed
        if self.correction is not None:
            self.corrections.append(float(self.correction.norm() / kept.norm().clamp_min(1e-300)))
            kept = kept + self.correction
            self.correction = None
        elif frac == 0.0:
            return 0.0  # nothing removed, nothing added: the step stands
        kept = kept.split(self.group.sizes())
        for p, b, d in zip(params, before, kept, strict=True):
            p.copy_(b + d.reshape(p.shape).to(p.dtype))
        return frac

    def state_dict(self) -> dict:
        """The current basis and its refresh step (a resumed run continues with them)."""
        basis = None if self.basis is None else self.basis.cpu()
        corr = None if self.correction is None else self.correction.cpu()
        return {"basis": basis, "refreshed_at": self.refreshed_at, "correction": corr}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        basis = state["basis"]
        ref = next(self.model.parameters())
        self.basis = None if basis is None else basis.to(ref.device)
        self.refreshed_at = state["refreshed_at"]
        corr = state.get("correction")
        self.correction = None if corr is None else corr.to(ref.device)


class ForgetReadouts:
    """The ``forget-subspace`` guard's directions: the forget readouts of each prompt's probes.

    Bound at theta_u (:meth:`bind`): the readouts stay defined against theta_0 and theta_u all
    along the run (:meth:`bridge.readouts.ReadoutSet.gradients_at`), and their values there are
    the targets the restoring correction returns them to. Called at the current weights it gives
    the readouts' gradients and their offsets from those targets (:class:`GuardRows`).
    """

    def __init__(self, base, probes: Sequence[Probes], names: Sequence[str], *, log_probs=None,
                 concept: int | None = None, restore: Sequence[str] | None = None):  # fmt: skip
        self.base, self.probes, self.names = base, list(probes), tuple(names)
        self.log_probs, self.concept = log_probs, concept
        self.restore = self.names if restore is None else tuple(restore)
        self.sets: list = []
        self.targets: list[np.ndarray] = []

    def bind(self, model: torch.nn.Module, group: ParameterGroup) -> None:
        """Build the readouts at the model's weights (theta_u) and record their values there."""
        from bridge.readouts import ReadoutSet

        self.sets = [
            ReadoutSet(self.base, model, group, pr, log_probs=self.log_probs, concept=self.concept)
            for pr in self.probes
        ]  # fmt: skip
        self.targets = []
        for rs in self.sets:
            values = rs.values(rs.theta_u, self.names)
            self.targets.append(np.array([values[n] for n in self.names], np.float64))

    def __call__(self, model: torch.nn.Module, group: ParameterGroup) -> GuardRows:
        if not self.sets:
            raise RuntimeError("bind the guard to the model first (`SubspaceGuard.bind`).")
        flat = group.values(model)
        rows, offsets = [], []
        for rs, target in zip(self.sets, self.targets, strict=True):
            got = rs.gradients_at(flat, self.names)
            rows.append(got.gradients)
            # One-sided: every readout rises with resurgence; one that fell is held where it is,
            # not pushed back up (that would spend benign loss on raising it again).
            offsets.append(np.maximum(got.values - target, 0.0))
        restored = np.tile([n in self.restore for n in self.names], len(self.sets))
        return GuardRows(np.concatenate(rows), np.concatenate(offsets), restored)


def forget_subspace_guard(
    base,
    probes: Probes | Sequence[Probes],
    *,
    readouts: Sequence[str] | None = None,
    log_probs=None,
    concept: int | None = None,
    refresh_every: int = 10,
    extra: np.ndarray | None = None,
    restore: bool = True,
    restore_readouts: Sequence[str] | None = None,
) -> SubspaceGuard:
    """The ``forget-subspace`` guard: span of the forget readouts' gradients at the current weights.

    Args:
      base: UNet at theta_0 (the readouts' reference).
      probes: one :class:`bridge.probes.Probes` per erased prompt or synonym (its ``forget``
        batches; its ``sampler`` for presence). Each contributes its own readout gradients.
      readouts: readout names (default ``presence``, ``presence_logprob`` when ``log_probs``
        is given, else ``output_rho``, ``forget_loss_recovery``); ``rho`` is allowed too. The
        presence gradient is estimated on ``probes.sampler``'s seeds, and presence is held on
        those seeds only: on other seeds it can still rise (tiny testbed, UCE, 40 GD steps, plain
        recovery 0.09-0.10: -0.03 to +0.04 on held-out 128-seed sets, with 128 or 256 guard
        seeds). Give it many seeds, and judge it on others.
      log_probs, concept: the classifier hook and the erased concept's class (presence).
      refresh_every: steps between re-estimates. extra: fixed extra directions ``(k, n)``.
      restore: at each refresh, also return the readouts to their values at theta_u (first
        order; see the module docstring). False: projection only.
      restore_readouts: the readouts whose rise the correction cancels, a subset of
        ``readouts`` (default ``presence`` with a classifier, else all of them); the others are
        held by the projection only. Why not ``presence_logprob``: near an erased concept's
        presence of 1e-5 its rise in log units is large where the probability hardly moves, and
        pulling it back spends benign loss for nothing measured (tiny testbed, MACE, AdamW).

    Raises:
      ValueError: empty ``probes``, or a ``restore_readouts`` name that is not guarded.

    Returns:
      :class:`SubspaceGuard`.
    """
    probe_list = [probes] if isinstance(probes, Probes) else list(probes)
    if not probe_list:
        raise ValueError("`probes` is empty: the forget-subspace guard needs the erased prompt.")
    if readouts is None:
        # With a classifier guard presence itself: the proxies' gradients also carry denoising
        # shared by benign prompts (testbed, ESD-x GD: +15% benign loss with them, +3% without).
        readouts = (
            ("presence", "presence_logprob")
            if log_probs is not None
            else ("output_rho", "forget_loss_recovery")
        )
    names = tuple(readouts)
    if restore_readouts is None:
        restore_readouts = ("presence",) if "presence" in names and log_probs is not None else names
    restore_readouts = tuple(restore_readouts)
    unknown = [r for r in restore_readouts if r not in names]
    if unknown or not restore_readouts:
        raise ValueError(
            f"`restore_readouts` must be a non-empty subset of the guarded readouts {list(names)}, "
            f"got {list(restore_readouts)}."
        )
    directions = ForgetReadouts(base, probe_list, names, log_probs=log_probs, concept=concept,
                                restore=restore_readouts)  # fmt: skip
    label = f"{len(probe_list)} prompt(s): {', '.join(names)}"
    if restore and restore_readouts != names:
        label += f"; restores {', '.join(restore_readouts)}"
    return SubspaceGuard(
        "forget-subspace",
        directions,
        refresh_every=refresh_every,
        extra=extra,
        label=label,
        restore=restore,
    )


def retain_core_guard(
    retain: Sequence[ProbeBatch], *, energy: float = 0.97, refresh_every: int = 10
) -> SubspaceGuard:
    """The PGU-style ``retain-core`` baseline: the retained concepts' core gradient space.

    Args:
      retain: probe batches of the retained concepts' denoising loss; each batch gives one
        gradient (use one batch per concept or more, small batches for a richer core).
      energy: share of the squared singular values kept (0.97: theory/guard.py's choice).
      refresh_every: steps between re-estimates at the current weights.

    Returns:
      :class:`SubspaceGuard`.

    Raises:
      ValueError: no retain batches, or ``energy`` outside (0, 1].
    """
    if not retain:
        raise ValueError("`retain` is empty: the retain-core guard needs the retained concepts.")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1], got {energy!r}.")

    def directions(model, group):
        grads = FrozenDiffusionLoss(model, group, retain).batch_gradients()
        return grads.detach().cpu().double().numpy()

    return SubspaceGuard(
        "retain-core",
        directions,
        refresh_every=refresh_every,
        energy=energy,
        label=f"PGU-style, {len(retain)} retain batches",
    )
