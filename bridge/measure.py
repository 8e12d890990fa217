"""Measure, on a real UNet, what the theory computes, and predict resurgence before fine-tuning.

Given theta_0 (base), theta_u (unlearned), the erased concept's prompts and a benign fine-tuning
set, :func:`measure_resurgence` returns the observables of theory.md s.4 under the same names:
``spectral_weights``, ``curvature_along_delta``, ``principal_angles``, ``predicted_rho`` (and,
with ``verify=True``, ``rho`` and ``forget_loss_recovery`` of actual full-batch GD on the frozen
fine-tuning loss).

Losses (all frozen quadratures, :mod:`bridge.loss`):

* fine-tuning loss: with ``finetune_latents`` the denoising loss on that data (target eps); with
  prompts only, the *in-distribution* loss whose targets are the base model's own predictions on
  noised N(0, I) latents (theory.md's in-distribution case: its gradient vanishes at theta_0).
* forget loss L_f: the same teacher loss on the forget prompts, so L_f(theta_0) = 0 and
  ``forget_loss_recovery`` measures how far fine-tuning brings theta back to the base's output
  on the erased concept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bridge.curvature import HessianOperator
from bridge.groups import select_group
from bridge.loss import FrozenDiffusionLoss, make_probe_batches, teacher_targets
from bridge.spectra import curvature_along, spectrum_ends
from bridge.subspaces import (
    finetune_gradient_subspace,
    forget_displacement,
    forget_loss_recovery,
    layerwise_forget_subspace,
    measured_rho,
    predicted_rho,
    principal_angles,
    spectral_weights,
)

__all__ = ["ResurgenceMeasurement", "measure_resurgence", "plot_spectrum", "summary"]


@dataclass
class ResurgenceMeasurement:
    """Labelled measurement; array fields carry their dimension in the name of the docs.

    Attributes:
      eigenvalues: ``(eigen,)`` top-k largest-algebraic then k most-negative Hessian eigenvalues
        of the fine-tuning loss at theta_u, descending within each end.
      spectral_weights: ``(eigen,)`` <v_i, delta/||delta||>^2.
      steps: ``(step,)`` GD step counts T. predicted_rho: ``(step,)`` rho_k(T) from theory.law.
      negative_dominated: ``(step,)`` True where negative-curvature terms dominate the prediction.
      negative_share: ``(step,)`` share of the prediction's magnitude from negative curvature.
      rho, forget_loss_recovery: ``(step,)`` of actual GD (NaN unless ``verify``).
      principal_angles: ``(angle,)`` radians, forget subspace vs fine-tuning gradient subspace.
      scalars: curvature_along_delta, lambda_perp, norms, losses, counts (see ``to_xarray``).
    """

    eigenvalues: np.ndarray
    spectral_weights: np.ndarray
    steps: np.ndarray
    predicted_rho: np.ndarray
    negative_dominated: np.ndarray
    negative_share: np.ndarray
    rho: np.ndarray
    forget_loss_recovery: np.ndarray
    principal_angles: np.ndarray
    scalars: dict = field(default_factory=dict)

    def to_xarray(self):
        """``xarray.Dataset`` with dims ``eigen``, ``step``, ``angle``; scalars as 0-d variables."""
        import xarray as xr

        data = {
            "eigenvalues": ("eigen", self.eigenvalues),
            "spectral_weights": ("eigen", self.spectral_weights),
            "predicted_rho": ("step", self.predicted_rho),
            "negative_dominated": ("step", self.negative_dominated.astype(np.int8)),
            "negative_share": ("step", self.negative_share),
            "rho": ("step", self.rho),
            "forget_loss_recovery": ("step", self.forget_loss_recovery),
            "principal_angles": ("angle", self.principal_angles),
        }
        for key, value in self.scalars.items():
            if isinstance(value, int | float | np.floating | np.integer):
                data[key] = ((), float(value))
        ds = xr.Dataset(
            data,
            coords={
                "step": self.steps,
                "eigen": np.arange(len(self.eigenvalues)),
                "angle": np.arange(len(self.principal_angles)),
            },
        )
        ds["principal_angles"].attrs["units"] = "radians"
        ds["step"].attrs["units"] = "GD steps"
        ds.attrs.update({k: str(v) for k, v in self.scalars.items() if isinstance(v, str)})
        return ds

    def save(self, out, *, args: dict, seed: int, wall_time: float) -> Path:
        """Write ``measurement.nc`` (h5netcdf), ``manifest.json``, ``spectrum.png`` to ``out``."""
        from experiments.manifest import write_manifest

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.to_xarray().to_netcdf(out / "measurement.nc", engine="h5netcdf")
        write_manifest(
            out,
            config=args,
            seeds={"seed": seed},
            wall_time=wall_time,
            extra={"scalars": self.scalars},
        )
        plot_spectrum(self, out / "spectrum.png")
        return out


def plot_spectrum(result: ResurgenceMeasurement, path) -> Path:
    """Figure: both ends of the fine-tuning Hessian spectrum, spectral weights of delta overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    idx = np.arange(len(result.eigenvalues))
    ax.stem(idx, result.eigenvalues, basefmt="k-", label="eigenvalue $\\lambda_i$")
    ax.set_xlabel("eigenpair index (top-k largest, then k most negative)")
    ax.set_ylabel("Hessian eigenvalue $\\lambda_i$ of the fine-tuning loss")
    twin = ax.twinx()
    twin.bar(
        idx,
        result.spectral_weights,
        alpha=0.35,
        color="tab:red",
        label="spectral weight $\\langle v_i, \\delta/\\|\\delta\\|\\rangle^2$",
    )
    twin.set_ylabel("spectral weight of the forget displacement $\\delta$")
    ax.set_title("Fine-tuning Hessian at $\\theta_u$ (both ends) and weights of $\\delta$")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _noised_inputs(n: int, unet, seed: int) -> torch.Tensor:
    size, chans = unet.config.sample_size, unet.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, chans, size, size, generator=gen, dtype=torch.float64)


def measure_resurgence(
    base,
    unlearned,
    text_encoder,
    *,
    forget_prompts: Sequence[str],
    finetune_prompts: Sequence[str],
    finetune_latents: torch.Tensor | None = None,
    params: str = "cross-attn-kv",
    top_k: int = 20,
    lr: float = 1e-5,
    steps: Sequence[int] = (1, 10, 100, 1000),
    seed: int = 0,
    batch_size: int = 4,
    draws: int = 1,
    subspace_rank: int = 4,
    alphas_cumprod: torch.Tensor | None = None,
    hvp_method: str = "double-backward",
    verify: bool = False,
    progress: bool = False,
) -> ResurgenceMeasurement:
    """Measure curvature and subspaces at theta_u and predict rho(T) by the theory's law.

    Args:
      base: UNet at theta_0. unlearned: UNet at theta_u (same architecture, device, dtype).
      text_encoder: :class:`bridge.tiny.TextEncoder` (tiny or real SD CLIP).
      forget_prompts: prompts of the erased concept (for L_f).
      finetune_prompts: benign fine-tuning prompts (captions of ``finetune_latents`` if given).
      finetune_latents: ``(N, C, H, W)`` fine-tuning data latents (VAE-encoded and scaled, or
        images used directly on a VAE-less testbed); None = in-distribution teacher loss.
      params: parameter group (preset of :data:`bridge.groups.PRESETS` or a regex).
      top_k: eigenpairs per end of the spectrum (2 top_k < group size).
      lr: GD step size of the predicted fine-tuning. steps: step counts T.
      seed: seed of every frozen draw (timesteps, noise, inputs, Lanczos start, SVD).
      batch_size: samples per probe batch. draws: (t, eps) draws per sample.
      subspace_rank: dimension of the fine-tuning gradient subspace (and per-layer forget rank 1).
      alphas_cumprod: ``(num_train_timesteps,)``; default the SD v1 schedule.
      hvp_method: see :data:`bridge.curvature.HVP_METHODS`.
      verify: also run max(steps) full-batch GD steps on the frozen fine-tuning loss and report
        the measured ``rho`` and ``forget_loss_recovery`` (cheap only for tiny models).
      progress: tqdm progress bars.

    Returns:
      :class:`ResurgenceMeasurement`.

    Raises:
      ValueError: for an empty group, a zero displacement, ``top_k`` too large for the group,
        or mismatched latents/prompts.
    """
    from bridge.tiny import tiny_scheduler

    if not forget_prompts or not finetune_prompts:
        raise ValueError("`forget_prompts` and `finetune_prompts` must both be non-empty")
    if finetune_latents is not None and len(finetune_latents) != len(finetune_prompts):
        raise ValueError(
            f"{len(finetune_latents)} fine-tuning latents but {len(finetune_prompts)} "
            "captions; give one caption per latent"
        )
    acp = tiny_scheduler().alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    ref = next(base.parameters())
    group = select_group(base, params)
    delta = forget_displacement(base, unlearned, group)
    if float(delta.abs().max()) == 0.0:
        raise ValueError(f"theta_u equals theta_0 over group {params!r}: nothing to measure")

    def batches(prompts, latents, teacher, offset):
        cond = text_encoder.encode_prompts(list(prompts)).to(ref.device, ref.dtype)
        x0 = _noised_inputs(len(prompts), base, seed + offset) if latents is None else latents
        out = make_probe_batches(
            x0.to(ref.device, ref.dtype),
            cond,
            acp,
            batch_size=batch_size,
            seed=seed + offset,
            draws=draws,
        )
        return teacher_targets(base, out) if teacher else out

    ft_batches = batches(finetune_prompts, finetune_latents, finetune_latents is None, 1)
    ft_loss = FrozenDiffusionLoss(unlearned, group, ft_batches)
    f_loss = FrozenDiffusionLoss(unlearned, group, batches(forget_prompts, None, True, 2))
    theta_u, theta_0 = ft_loss.theta(), group.values(base).to(ref.device, ref.dtype)

    op = HessianOperator(ft_loss, theta_u, method=hvp_method, progress=progress)
    ends = spectrum_ends(op, top_k, seed=seed)
    grad = op.gradient()
    pred = predicted_rho(
        ends.eigenvalues,
        ends.eigenvectors,
        lambda v: (
            (op @ torch.as_tensor(v, dtype=op.dtype, device=op.device)).cpu().double().numpy()
        ),
        grad,
        delta,
        lr=lr,
        steps=steps,
    )
    forget_basis = layerwise_forget_subspace(delta, group, rank=1)
    ft_basis = finetune_gradient_subspace(ft_loss, theta_u, rank=subspace_rank, seed=seed)
    angles = principal_angles(forget_basis, ft_basis)

    rho = np.full(len(pred.steps), np.nan)
    recovery = np.full(len(pred.steps), np.nan)
    lf_u, lf_0 = f_loss.value(theta_u), f_loss.value(theta_0)
    if verify:
        theta, wanted = theta_u.clone(), {int(t): i for i, t in enumerate(pred.steps)}
        for t in range(1, int(pred.steps.max()) + 1):
            theta = theta - lr * ft_loss.gradient(theta)
            if t in wanted:
                rho[wanted[t]] = measured_rho(theta, theta_u, delta)
                recovery[wanted[t]] = forget_loss_recovery(lf_u, f_loss.value(theta), lf_0)
        for t, i in wanted.items():
            if t == 0:
                rho[i], recovery[i] = 0.0, 0.0

    scalars = {
        "curvature_along_delta": curvature_along(op, delta),
        "lambda_perp": pred.lambda_perp,
        "delta_norm": float(delta.norm()),
        "grad_norm": float(grad.norm()),
        "finetune_loss_unlearned": ft_loss.value(theta_u),
        "forget_loss_unlearned": lf_u,
        "forget_loss_base": lf_0,
        "group_size": group.numel,
        "num_hvps": op.num_matvecs,
        "lr": float(lr),
        "params": params,
        "hvp_method": hvp_method,
        "attention_fallback": str(op.attention_fallback),
        "finetune_target": "teacher (in-distribution)"
        if finetune_latents is None
        else "data (eps)",
    }
    return ResurgenceMeasurement(
        eigenvalues=ends.eigenvalues,
        spectral_weights=spectral_weights(ends.eigenvectors, delta),
        steps=pred.steps,
        predicted_rho=pred.predicted_rho,
        negative_dominated=pred.negative_dominated,
        negative_share=pred.negative_share,
        rho=rho,
        forget_loss_recovery=recovery,
        principal_angles=angles,
        scalars=scalars,
    )


def summary(result: ResurgenceMeasurement) -> str:
    """A few human-readable lines (printed by the CLI)."""
    lines = [f"{k}: {v}" for k, v in result.scalars.items()]
    for t, p, r, neg in zip(
        result.steps, result.predicted_rho, result.rho, result.negative_dominated, strict=True
    ):
        flag = "  [negative-curvature directions dominate]" if neg else ""
        lines.append(f"T={int(t)}: predicted_rho={p:.4g} rho={r:.4g}{flag}")
    lines.append(
        "principal_angles (rad): " + json.dumps(np.round(result.principal_angles, 4).tolist())
    )
    return "\n".join(lines)
