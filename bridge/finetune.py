r"""Benign fine-tuning of an unlearned UNet with resurgence tracking, checkpoints and resume.

Every ``track_every`` steps the tracker records, over the measured parameter group
(theory.md section 4):

.. math:: \rho(T) = -\frac{\langle \theta_T - \theta_u, \delta\rangle}{\|\delta\|^2},
          \quad \delta = \theta_u - \theta_0,

``forget_loss_recovery`` :math:`(L_f(\theta_u) - L_f(\theta_T)) / (L_f(\theta_u) - L_f(\theta_0))`
and any presence hooks (erased concepts under their own prompts, incidental presence under
unrelated prompts). A checkpoint (trainable tensors, optimizer, RNG, history) is written
atomically every ``checkpoint_every`` steps; a rerun with the same output folder resumes from
it and reproduces the uninterrupted run exactly. A non-finite loss stops the run with the last
good state saved and raises :class:`NonFiniteLossError`.

The fine-tuning protocol of the paper's authors (diffusers' ``examples/text_to_image/
train_text_to_image.py``, which the resurgence paper's fine-tuning follows) has three more knobs,
all off by default so that earlier runs and their checkpoints are unchanged: a cosine learning-rate
decay to 0 over ``steps`` (``--lr_scheduler cosine``, diffusers' ``get_cosine_schedule_with_warmup``
with no warm-up), gradient-norm clipping before each step (``--max_grad_norm``, the script's
default 1.0) and an EMA of the trained weights (``--use_ema``, diffusers' ``EMAModel``, decay
0.9999 in the script). With EMA the tracked readouts and the returned UNet use the EMA weights.
An optional :class:`bridge.guard.SubspaceGuard` projects every update off a guard subspace.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from bridge.groups import ParameterGroup, select_group
from bridge.loss import ProbeBatch
from bridge.subspaces import forget_loss_recovery
from theory._atomic import atomic_write, atomic_write_text, remove_partial_writes

__all__ = [
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneResult",
    "NonFiniteLossError",
    "finetune",
    "forget_loss",
    "group_values",
    "resurgence_rho",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
#: Fields added after the first release, left out of :meth:`FinetuneConfig.digest` at these
#: defaults so that checkpoints of earlier runs still resume.
_LATER_FIELDS = {"schedule": "constant", "grad_clip": None, "ema_decay": None}


class NonFiniteLossError(RuntimeError):
    """Raised when the fine-tuning loss becomes NaN/inf; the last good state is on disk."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    r"""Fine-tuning hyper-parameters (all recorded in the checkpoint and manifest).

    Attributes:
      steps: optimizer steps. lr: learning rate. optimizer: ``"sgd"`` or ``"adamw"``.
      weight_decay: AdamW decoupled weight decay. batch_size: images per step (stochastic mode).
      trainable: parameter group trained: a :data:`bridge.groups.PRESETS` name or a regex over
        parameter names (``"all"`` = full fine-tuning), or ``"lora"``.
      lora_rank: LoRA rank when ``trainable == "lora"`` (targets attention projections).
      measured_group: group over which ``rho`` is measured (``"cross-attn-kv"``).
      track_every: steps between tracking records. checkpoint_every: steps between checkpoints.
      p_null: caption drop probability (classifier-free guidance, as in pretraining).
      full_batch: if True, every step is a full-batch GD step on the frozen probe batches
        (the setting of the resurgence law); otherwise minibatches are drawn from the data.
      seed: seed of minibatches, timesteps and noise.
      schedule: ``"constant"`` learning rate, or ``"cosine"``: step k (1-based) uses
        :math:`\tfrac12\,\mathrm{lr}\,(1 + \cos(\pi (k-1)/\mathrm{steps}))`, so after k steps
        the optimizer holds :math:`\tfrac12\,\mathrm{lr}(1+\cos(\pi k/\mathrm{steps}))`
        (diffusers' ``get_cosine_schedule_with_warmup``, no warm-up).
      grad_clip: max global gradient norm over the trainable parameters
        (``torch.nn.utils.clip_grad_norm_`` before each step), or None.
      ema_decay: decay of diffusers' ``EMAModel`` over the trainable parameters (its default
        warm-up: decay 0 at the first step, then :math:`\min(d, k/(9+k))` at step k), or None.
    """

    steps: int = 100
    lr: float = 1e-4
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = 0.0
    batch_size: int = 16
    trainable: str = "all"
    lora_rank: int = 4
    measured_group: str = "cross-attn-kv"
    track_every: int = 10
    checkpoint_every: int = 10
    p_null: float = 0.0
    full_batch: bool = False
    seed: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = None
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"`optimizer` must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}."
            )
        if self.steps < 0 or self.track_every < 1 or self.checkpoint_every < 1:
            raise ValueError("`steps` must be >= 0 and `track_every`, `checkpoint_every` >= 1.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {self.schedule!r}.")
        clip = self.grad_clip
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"`grad_clip` must be a finite max norm > 0 or None, got {clip!r}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1) or None, got {self.ema_decay!r}.")

    def digest(self, extra: dict | None = None) -> str:
        """Hash of the config (a checkpoint only resumes a run with the same config).

        Fields added later are hashed only when set, so earlier checkpoints keep their digest;
        ``extra`` (e.g. the guard's :meth:`~bridge.guard.SubspaceGuard.spec`) is hashed with it.
        """
        fields = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        if extra:
            fields["extra"] = extra
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass
class FinetuneData:
    """Fine-tuning data: model-space images ``(N, C, H, W)`` (pixels or VAE latents, scaled) and
    their text embeddings ``(N, seq, dim)``; ``null_embedding`` ``(1, seq, dim)`` for ``p_null``.
    ``probe_batches`` (frozen quadrature from :func:`bridge.loss.make_probe_batches`) are used
    when ``FinetuneConfig.full_batch`` is True."""

    images: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    null_embedding: torch.Tensor | None = None
    probe_batches: Sequence[ProbeBatch] | None = None

    def __post_init__(self) -> None:
        if self.images is None and self.probe_batches:
            return  # full-batch GD on the frozen quadrature only
        if self.images is None or self.embeddings is None:
            raise ValueError(
                "give `images` and `embeddings`, or `probe_batches` for full-batch GD."
            )
        if len(self.images) == 0:
            raise ValueError("fine-tuning data is empty: give at least one image.")
        if self.embeddings.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.embeddings.shape[0]} caption embeddings."
            )


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned UNet (LoRA merged; the EMA weights when ``ema_decay`` is set), the tracking
    history, the output folder and, with a guard, the share of each update's norm it removed
    (``guard_removed[k-1]`` for step k)."""

    unet: Any
    history: list[dict[str, float]]
    out_dir: Path | None
    guard_removed: list[float] = dataclasses.field(default_factory=list)


def resurgence_rho(theta_t: torch.Tensor, theta_u: torch.Tensor, theta_0: torch.Tensor) -> float:
    r""":math:`\rho = -\langle\theta_T - \theta_u, \delta\rangle/\|\delta\|^2` of flat ``(n,)``.

    >>> resurgence_rho(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]))
    0.5

    Raises:
      ValueError: if delta = theta_u - theta_0 is zero (nothing was unlearned in this group).
    """
    delta = (theta_u - theta_0).double()
    nrm = float(delta @ delta)
    if nrm == 0.0:
        raise ValueError(
            "delta = theta_u - theta_0 is zero over the measured group: nothing to track."
        )
    return float(-((theta_t.double() - theta_u.double()) @ delta) / nrm)


@torch.no_grad()
def forget_loss(unet, batches: Sequence[ProbeBatch]) -> float:
    """Mean squared epsilon error of ``unet`` on frozen probe batches of the forget concept."""
    ref = next(unet.parameters())
    total = 0.0
    for b in batches:
        b = b.to(ref.device, ref.dtype)
        err = unet(b.noisy, b.timesteps, encoder_hidden_states=b.cond).sample - b.target
        total += float((err * err).mean())
    return total / len(batches)


def group_values(unet, group: ParameterGroup) -> torch.Tensor:
    """Effective values of ``group`` in ``unet``, flat ``(n,)``: LoRA deltas merged in."""
    modules = dict(unet.named_modules())
    params = dict(unet.named_parameters())
    out = []
    for name in group.names:
        if name in params:
            out.append(params[name].detach().reshape(-1))
            continue
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        base = getattr(module, "base_layer", module)
        value = getattr(base, leaf).detach()
        if leaf == "weight" and hasattr(module, "get_delta_weight"):
            for adapter in getattr(module, "active_adapters", []):
                value = value + module.get_delta_weight(adapter).detach()
        out.append(value.reshape(-1))
    return torch.cat(out)


def _merged_copy(start_unet, trained, lora: bool):
    if not lora:
        return trained
    merged = copy.deepcopy(start_unet)
    group = select_group(merged, r"attn[12]\.(to_[qkv]|to_out\.0)\.weight$")
    values = group.unflatten(group_values(trained, group).to(next(merged.parameters())))
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    return merged


def _trainable_unet(unet, cfg: FinetuneConfig):
    model = copy.deepcopy(unet)
    if cfg.trainable == "lora":
        from peft import LoraConfig

        model.requires_grad_(False)
        # peft draws the adapters' initial weights from torch's GLOBAL generator: seed it here
        # (without touching the caller's stream) so a run depends on cfg.seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                )
            )
    else:
        group = set(select_group(model, cfg.trainable).names)
        for n, p in model.named_parameters():
            p.requires_grad_(n in group)
    return model


def _load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None (with a warning) if it cannot be read.

    Checkpoints are written atomically, so one that exists is complete; a file damaged outside
    this program (a copy cut short) is not trusted: the run starts again from step 0, which
    gives the same result because the run is deterministic.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "config_digest" not in state:
            raise ValueError("not a fine-tuning checkpoint")
    except Exception as err:  # torch raises RuntimeError, pickle/zip errors, EOFError, ...
        warnings.warn(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
            "starting from step 0 (it will be overwritten).",
            stacklevel=3,
        )
        return None
    return state


def _lr_schedule(opt, cfg: FinetuneConfig):
    """The LambdaLR of ``cfg.schedule`` (None for a constant learning rate: nothing to step)."""
    if cfg.schedule == "constant":
        return None
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=cfg.steps)


def _ema(trainable, cfg: FinetuneConfig):
    """diffusers' ``EMAModel`` over ``trainable`` (None without ``ema_decay``)."""
    if cfg.ema_decay is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(trainable, decay=cfg.ema_decay)


@contextlib.contextmanager
def _ema_weights(ema, trainable):
    """Swap the EMA weights into the model for the block (exactly restored after it)."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


def finetune(
    unet,
    data: FinetuneData,
    cfg: FinetuneConfig,
    *,
    scheduler,
    base_unet=None,
    forget_batches: Sequence[ProbeBatch] | None = None,
    presence: Callable[[Any], dict[str, float]] | None = None,
    guard=None,
    out_dir: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``unet`` (the unlearned theta_u) on ``data``, tracking resurgence.

    One step: loss, backward, clip (``grad_clip``), optimizer step, guard projection of the step's
    parameter change, learning-rate schedule, EMA update.

    Args:
      unet: the unlearned UNet (not modified; a copy is trained).
      data: :class:`FinetuneData`.
      cfg: :class:`FinetuneConfig`.
      scheduler: training noise scheduler (``add_noise``).
      base_unet: the original theta_0; needed for ``rho`` and ``forget_loss_recovery``.
      forget_batches: frozen probe batches of the erased concept (its images and prompt) for
        ``forget_loss_recovery``.
      presence: hook ``unet -> {name: value}`` evaluated at every tracking step.
      guard: a :class:`bridge.guard.SubspaceGuard` (or None): every update is projected off its
        subspace, re-estimated every ``guard.refresh_every`` steps; the share of each update it
        removed is recorded (``guard_removed`` in the history records and the result).
      out_dir: folder for ``checkpoint.pt``, ``history.json`` and the final ``unet/``; a rerun
        with the same folder and config resumes from the checkpoint.
      on_step: called with the step number after each step (tests use it to interrupt a run).

    Returns:
      :class:`FinetuneResult`.

    Raises:
      NonFiniteLossError: if the loss becomes non-finite (the last good state is saved).
      ValueError: if a checkpoint in ``out_dir`` was written with another config; a guard with
        LoRA fine-tuning; a guard that removes the whole update (:class:`bridge.guard.GuardError`).
    """
    if guard is not None and cfg.trainable == "lora":
        raise ValueError("`guard` projects the trained weights' updates: not trainable='lora'.")
    model = _trainable_unet(unet, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = _lr_schedule(opt, cfg)
    ema = _ema(trainable, cfg)
    if guard is not None:
        guard.bind(model, [n for n, p in model.named_parameters() if p.requires_grad])
    digest = cfg.digest(guard.spec() if guard is not None else None)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = next(unet.parameters())

    group = select_group(unet, cfg.measured_group)
    theta_u = group.values(unet)
    theta_0 = group.values(base_unet) if base_unet is not None else None
    lf_u = lf_0 = None
    if forget_batches and base_unet is not None:
        lf_u, lf_0 = forget_loss(unet, forget_batches), forget_loss(base_unet, forget_batches)
        if lf_u == lf_0:  # NaN in history.json is not JSON; leave the undefined field out
            warnings.warn(
                f"`forget_loss_recovery` is undefined (forget loss {lf_u!r} at theta_u and "
                "theta_0): the history records `forget_loss` only.",
                stacklevel=2,
            )

    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoint.pt" if out is not None else None
    history: list[dict[str, float]] = []
    removed_log: list[float] = []
    start = 0
    if out is not None:
        remove_partial_writes(out)  # temporaries of a killed run; never a finished file
    state = _load_checkpoint(ckpt) if ckpt is not None and ckpt.is_file() else None
    if state is not None:
        if state["config_digest"] != digest:
            raise ValueError(
                f"checkpoint {ckpt} was written with another fine-tuning config "
                f"({state['config']}); use a new --out folder or delete the checkpoint."
            )
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in names:
                params[n].copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        if lr_sched is not None:
            lr_sched.load_state_dict(state["lr_schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if guard is not None:
            guard.load_state_dict(state["guard"])
            removed_log = list(state["guard_removed"])
        gen.set_state(state["rng"])
        start, history = state["step"], state["history"]

    def save_checkpoint(step: int) -> None:
        if ckpt is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        trainable_state = {
            n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        snapshot = {
            "step": step,
            "trainable": trainable_state,
            "optimizer": opt.state_dict(),
            "rng": gen.get_state(),
            "history": history,
            "config": dataclasses.asdict(cfg),
            "config_digest": digest,
        }
        if lr_sched is not None:
            snapshot["lr_schedule"] = lr_sched.state_dict()
        if ema is not None:
            snapshot["ema"] = ema.state_dict()
        if guard is not None:
            snapshot["guard"], snapshot["guard_removed"] = guard.state_dict(), removed_log
        atomic_write(ckpt, lambda tmp: torch.save(snapshot, tmp))

    def track(step: int, loss: float | None) -> None:
        rec: dict[str, float | None] = {"step": step, "loss": loss}
        if lr_sched is not None:
            rec["lr"] = float(opt.param_groups[0]["lr"])  # the lr of step + 1
        if guard is not None and step > 0:
            since = removed_log[-(step - history[-1]["step"]) :] if history else removed_log
            rec["guard_removed"] = float(sum(since) / len(since))
            rec["guard_removed_max"] = float(max(since))
        with _ema_weights(ema, trainable):
            if theta_0 is not None:
                rec["rho"] = resurgence_rho(group_values(model, group), theta_u, theta_0)
            if lf_u is not None:
                rec["forget_loss"] = forget_loss(model, forget_batches)
                if lf_u != lf_0:
                    lf_t = rec["forget_loss"]
                    rec["forget_loss_recovery"] = forget_loss_recovery(lf_u, lf_t, lf_0)
            if presence is not None:
                rec.update({k: float(v) for k, v in presence(model).items()})
        history.append(rec)

    def step_loss() -> torch.Tensor:
        if cfg.full_batch:
            if not data.probe_batches:
                raise ValueError("`full_batch=True` needs `data.probe_batches`.")
            total = 0.0
            for b in data.probe_batches:
                b = b.to(ref.device, ref.dtype)
                err = model(b.noisy, b.timesteps, encoder_hidden_states=b.cond).sample - b.target
                total = total + (err * err).mean()
            return total / len(data.probe_batches)
        n = data.images.shape[0]
        idx = torch.randint(
            0, n, (min(cfg.batch_size, n) if cfg.batch_size > 0 else n,), generator=gen
        )
        x0 = data.images[idx].to(ref)
        c = data.embeddings[idx].to(ref)
        if cfg.p_null > 0 and data.null_embedding is not None:
            drop = torch.rand(len(idx), generator=gen) < cfg.p_null
            c = torch.where(drop[:, None, None], data.null_embedding.to(ref), c)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(ref)
        xt = scheduler.add_noise(x0, noise, t)
        err = model(xt, t.to(ref.device), encoder_hidden_states=c).sample - noise
        return (err * err).mean()

    model.eval()  # no dropout: the loss is a deterministic function of weights and draws
    if start == 0 and not history:
        with torch.no_grad():
            track(0, None)
    for step in tqdm(range(start + 1, cfg.steps + 1), desc="finetune", disable=not progress):
        if guard is not None:
            guard.maybe_refresh(step - 1)  # before the loss: its backward must not mix in
        loss = step_loss()
        if not torch.isfinite(loss):
            save_checkpoint(step - 1)
            where = f"; last good state (step {step - 1}) saved in {ckpt}" if ckpt else ""
            raise NonFiniteLossError(
                f"fine-tuning loss is {float(loss.detach())} at step {step} (lr={cfg.lr}, "
                f"optimizer={cfg.optimizer}){where}. Lower the learning rate."
            )
        opt.zero_grad()
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        before = [p.detach().clone() for p in trainable] if guard is not None else None
        opt.step()
        if guard is not None:
            removed_log.append(guard.project_step(before, trainable, step))
        if lr_sched is not None:
            lr_sched.step()
        if ema is not None:
            ema.step(trainable)
        last_loss = float(loss.detach())
        if step % cfg.track_every == 0 or step == cfg.steps:
            with torch.no_grad():
                track(step, last_loss)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(step)
        if on_step is not None:
            on_step(step)
    if ema is not None:
        ema.copy_to(trainable)
    final = _merged_copy(unet, model, cfg.trainable == "lora").eval()
    if out is not None:
        atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
    return FinetuneResult(unet=final, history=history, out_dir=out, guard_removed=removed_log)
