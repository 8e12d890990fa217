"""Measured readouts of actual GD (pipeline step 5), and the whole pipeline in one call.

:func:`measure_gd` runs full-batch GD on the frozen fine-tuning loss over the group, starting at
theta_u, and evaluates the readouts of :mod:`bridge.readouts` on the same probes (the same forget
batches, the same sampler seeds) at each requested step: what :mod:`bridge.predict` predicted.

:func:`measure_resurgence` composes the pipeline of architecture.md for one learning rate:
probes (:mod:`bridge.probes`) -> readout gradients (:mod:`bridge.readouts`) -> curvature
(:mod:`bridge.local_curvature`) -> predictions (:mod:`bridge.predict`) -> optionally the measured
GD run, and returns the observables of theory.md s.4 under their names (``spectral_weights``,
``curvature_along_delta``, ``principal_angles``, ``predicted_rho``, ``rho``,
``forget_loss_recovery``, ``output_rho``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from bridge.curvature import HessianOperator
from bridge.hygiene import check_group_covers_edit
from bridge.local_curvature import measure_local_curvature
from bridge.loss import FrozenDiffusionLoss
from bridge.predict import predict_readouts
from bridge.probes import Probes, finetune_probes, forget_probes, sampler_probe
from bridge.readouts import ReadoutSet
from bridge.spectra import curvature_along
from bridge.subspaces import (
    finetune_gradient_subspace,
    layerwise_forget_subspace,
    principal_angles,
    spectral_weights,
)

__all__ = [
    "MeasuredReadouts",
    "ResurgenceMeasurement",
    "measure_gd",
    "measure_resurgence",
    "plot_spectrum",
    "summary",
]


@dataclass(frozen=True)
class MeasuredReadouts:
    """Readouts along one GD run from theta_u.

    Attributes:
      names: readout names ``(N,)``. lr: GD step size. steps: ``(S,)`` step counts.
      values: ``(N, S)`` measured readouts (same units as :class:`~bridge.readouts.ReadoutSet`).
      seeds: sampler seeds the presence readouts used.
    """

    names: tuple[str, ...]
    lr: float
    steps: np.ndarray
    values: np.ndarray
    seeds: tuple[int, ...] = ()

    def get(self, name: str) -> np.ndarray:
        """``(S,)`` measured values of readout ``name``."""
        return self.values[self.names.index(name)]


def measure_gd(
    finetune_loss: FrozenDiffusionLoss,
    readouts: ReadoutSet,
    *,
    lr: float,
    steps: Sequence[int],
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> MeasuredReadouts:
    r"""Full-batch GD :math:`\theta_{t+1} = \theta_t - \eta \nabla L_{ft}(\theta_t)` from theta_u.

    Args:
      finetune_loss: the frozen fine-tuning loss over the group (the one whose Hessian the
        prediction used). readouts: the readouts, over the same group.
      lr: step size eta. steps: step counts at which readouts are recorded (0 allowed).
      names: readouts to record (default all of ``readouts``).
      progress: tqdm bar over GD steps.

    Returns:
      :class:`MeasuredReadouts`.

    Raises:
      ValueError: a loss over another group than the readouts', or a negative step.
    """
    if finetune_loss.group.names != readouts.group.names:
        raise ValueError(
            f"the fine-tuning loss is over group {finetune_loss.group.spec!r} but the readouts "
            f"over {readouts.group.spec!r}; measure and fine-tune the same group."
        )
    t = np.asarray(list(steps), dtype=np.int64)
    if t.size and t.min() < 0:
        raise ValueError(f"`steps` must be >= 0; got {t.tolist()}.")
    names = readouts.names if names is None else tuple(names)
    wanted = {int(s): j for j, s in enumerate(t)}
    values = np.zeros((len(names), t.size))
    theta = readouts.theta_u.clone()

    def record(step):
        if step in wanted:
            got = readouts.values(theta, names)
            values[:, wanted[step]] = [got[n] for n in names]

    record(0)
    for step in tqdm(range(1, int(t.max(initial=0)) + 1), desc="GD", disable=not progress):
        theta = theta - lr * finetune_loss.gradient(theta)
        record(step)
    sampler = readouts.probes.sampler
    return MeasuredReadouts(names, float(lr), t, values, tuple(sampler.seeds) if sampler else ())


@dataclass
class ResurgenceMeasurement:
    """Labelled measurement at theta_u, with the law's predictions and (optionally) GD's values.

    Attributes:
      eigenvalues: ``(eigen,)`` top-k largest-algebraic then k most-negative Hessian eigenvalues
        of the fine-tuning loss at theta_u, descending within each end.
      spectral_weights: ``(eigen,)`` <v_i, delta/||delta||>^2.
      steps: ``(step,)`` GD step counts T. predicted_rho: ``(step,)`` rho_k(T) (closure law).
      negative_dominated: ``(step,)`` True where ``negative_share > 1/2``.
      negative_share: ``(step,)`` share of the law's absolute total carried by its terms of
        negative curvature, term by term (:func:`bridge.subspaces.negative_curvature_share`).
      rho, forget_loss_recovery: ``(step,)`` of actual GD (NaN unless ``verify``).
      principal_angles: ``(angle,)`` radians, forget subspace vs fine-tuning gradient subspace.
      readout_names: the readouts. predicted_readouts: ``(readout, step)`` by the closure law;
        krylov_readouts: ``(readout, step)`` by the Krylov predictor (NaN without
        ``krylov_depth``); measured_readouts: ``(readout, step)`` of actual GD (NaN unless
        ``verify``).
      scalars: curvature_along_delta, lambda_perp, norms, losses, HVP counts.
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
    readout_names: tuple[str, ...] = ()
    predicted_readouts: np.ndarray | None = None
    krylov_readouts: np.ndarray | None = None
    measured_readouts: np.ndarray | None = None
    scalars: dict = field(default_factory=dict)

    def to_xarray(self):
        """``xarray.Dataset`` with dims ``eigen``, ``step``, ``angle``, ``readout``."""
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
        for key, arr in (
            ("predicted_readouts", self.predicted_readouts),
            ("krylov_readouts", self.krylov_readouts),
            ("measured_readouts", self.measured_readouts),
        ):
            if arr is not None:
                data[key] = (("readout", "step"), arr)
        for key, value in self.scalars.items():
            if isinstance(value, int | float | np.floating | np.integer):
                data[key] = ((), float(value))
        ds = xr.Dataset(
            data,
            coords={
                "step": self.steps,
                "eigen": np.arange(len(self.eigenvalues)),
                "angle": np.arange(len(self.principal_angles)),
                "readout": list(self.readout_names),
            },
        )
        ds["principal_angles"].attrs["units"] = "radians"
        ds["step"].attrs["units"] = "GD steps"
        ds.attrs.update({k: str(v) for k, v in self.scalars.items() if isinstance(v, str)})
        return ds


def plot_spectrum(result: ResurgenceMeasurement, path) -> None:
    """Figure: both ends of the fine-tuning Hessian spectrum, spectral weights of delta overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from theory._atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    idx = np.arange(len(result.eigenvalues))
    ax.stem(idx, result.eigenvalues, basefmt="k-", label="eigenvalue $\\lambda_i$")
    ax.set_xlabel("eigenpair index (top-k largest, then k most negative)")
    ax.set_ylabel("Hessian eigenvalue $\\lambda_i$ of the fine-tuning loss")
    twin = ax.twinx()
    twin.bar(idx, result.spectral_weights, alpha=0.35, color="tab:red",
             label="spectral weight $\\langle v_i, \\delta/\\|\\delta\\|\\rangle^2$")
    twin.set_ylabel("spectral weight of the forget displacement $\\delta$")
    ax.set_title("Fine-tuning Hessian at $\\theta_u$ (both ends) and weights of $\\delta$")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def measure_resurgence(
    base,
    unlearned,
    text_encoder,
    *,
    forget_prompts: Sequence[str],
    finetune_prompts: Sequence[str],
    finetune_latents: torch.Tensor | None = None,
    forget_latents: torch.Tensor | None = None,
    params: str = "cross-attn-kv",
    method: str | None = None,
    top_k: int = 20,
    krylov_depth: int | None = None,
    lr: float = 1e-5,
    steps: Sequence[int] = (1, 10, 100, 1000),
    seed: int = 0,
    batch_size: int = 4,
    draws: int = 1,
    subspace_rank: int = 4,
    scheduler=None,
    forget_seeds: Sequence[int] = (0, 1, 2, 3),
    sample_steps: int = 20,
    guidance_scale: float = 7.5,
    hvp_method: str = "double-backward",
    verify: bool = False,
    progress: bool = False,
) -> ResurgenceMeasurement:
    """Curvature, readouts and subspaces at theta_u; predicted (and with ``verify``, measured) GD.

    Args:
      base: UNet at theta_0. unlearned: UNet at theta_u (same architecture, device, dtype).
      text_encoder: :class:`bridge.sd.TextEncoder` (tiny or real SD CLIP).
      forget_prompts: prompts of the erased concept.
      finetune_prompts: benign fine-tuning prompts (captions of ``finetune_latents`` if given).
      finetune_latents: ``(N, C, H, W)`` fine-tuning data; None = in-distribution teacher loss.
      forget_latents: ``(M, C, H, W)`` erased-concept data; None = samples of the base model
        under the forget prompts from ``forget_seeds`` (the forget loss has target eps).
      params: the measured and fine-tuned group (a :data:`bridge.groups.PRESETS` name or regex);
        it must cover every tensor the unlearning edited. method: the method's name (messages).
      top_k: eigenpairs per end. krylov_depth: Lanczos steps at g for the Krylov predictor.
      lr: GD step size. steps: step counts T. seed: seed of every frozen draw.
      batch_size, draws: probe batches. subspace_rank: fine-tuning gradient subspace rank.
      scheduler: the training scheduler (default SD v1's). forget_seeds, sample_steps,
        guidance_scale: the DDIM sampling of the forget data.
      hvp_method: see :data:`bridge.curvature.HVP_METHODS`.
      verify: also run max(steps) GD steps on the frozen loss and record the readouts.
      progress: tqdm progress bars.

    Returns:
      :class:`ResurgenceMeasurement`.

    Raises:
      ValueError: a group that misses the edit or where delta is zero, ``top_k`` too large,
        mismatched latents/prompts.
    """
    from bridge.tiny import tiny_scheduler

    if not forget_prompts or not finetune_prompts:
        raise ValueError("`forget_prompts` and `finetune_prompts` must both be non-empty")
    scheduler = tiny_scheduler() if scheduler is None else scheduler
    acp = scheduler.alphas_cumprod
    group = check_group_covers_edit(base, unlearned, params, method=method)
    sampler = sampler_probe(
        text_encoder,
        forget_prompts[0],
        scheduler=scheduler,
        seeds=forget_seeds,
        steps=sample_steps,
        guidance_scale=guidance_scale,
    )
    common = {"alphas_cumprod": acp, "batch_size": batch_size, "seed": seed, "draws": draws}
    probes = Probes(
        finetune=finetune_probes(
            text_encoder, finetune_prompts, finetune_latents, teacher=base, **common
        ),
        forget=forget_probes(
            text_encoder, forget_prompts, forget_latents, base=base, sampler=sampler, **common
        ),
        sampler=None,
        seed=seed,
    )
    ft_loss = FrozenDiffusionLoss(unlearned, group, probes.finetune)
    readouts = ReadoutSet(base, unlearned, group, probes)
    grads = readouts.gradients()
    op = HessianOperator(ft_loss, ft_loss.theta(), method=hvp_method, progress=progress)
    curv = measure_local_curvature(op, top_k=top_k, krylov_depth=krylov_depth, seed=seed)
    closure = predict_readouts(curv, grads, lrs=[lr], steps=steps, predictor="closure")
    krylov = None
    if krylov_depth is not None:
        krylov = predict_readouts(curv, grads, lrs=[lr], steps=steps, predictor="krylov")
    rho_at = grads.names.index("rho")
    share = closure.negative_share[rho_at, 0]
    delta = readouts.delta
    forget_basis = layerwise_forget_subspace(delta, group, rank=1)
    ft_basis = finetune_gradient_subspace(ft_loss, readouts.theta_u, rank=subspace_rank, seed=seed)
    measured = np.full((len(grads.names), len(closure.steps)), np.nan)
    if verify:
        measured = measure_gd(ft_loss, readouts, lr=lr, steps=steps, progress=progress).values
    scalars = {
        "curvature_along_delta": curvature_along(op, delta),
        "lambda_perp": curv.lambda_perp,
        "delta_norm": float(delta.norm()),
        "grad_norm": float(np.linalg.norm(curv.gradient)),
        "finetune_loss_unlearned": ft_loss.value(readouts.theta_u),
        "forget_loss_unlearned": readouts.loss_u,
        "forget_loss_base": readouts.loss_0,
        "group_size": group.numel,
        "num_hvps": op.num_matvecs,
        **{f"hvps_{k}": v for k, v in curv.hvps.items()},
        "lr": float(lr),
        "params": params,
        "hvp_method": hvp_method,
        "attention_fallback": str(op.attention_fallback),
        "finetune_target": "teacher (in-distribution)" if finetune_latents is None else "data (eps)",
        "forget_target": "data (eps) on "
        + ("base-model samples" if forget_latents is None else "given latents"),
    }
    return ResurgenceMeasurement(
        eigenvalues=curv.eigenvalues,
        spectral_weights=spectral_weights(curv.eigenvectors, delta),
        steps=closure.steps,
        predicted_rho=closure.get("rho")[0],
        negative_dominated=share > 0.5,
        negative_share=share,
        rho=measured[rho_at],
        forget_loss_recovery=measured[grads.names.index("forget_loss_recovery")],
        principal_angles=principal_angles(forget_basis, ft_basis),
        readout_names=grads.names,
        predicted_readouts=closure.predicted[:, 0],
        krylov_readouts=None if krylov is None else krylov.predicted[:, 0],
        measured_readouts=measured,
        scalars=scalars,
    )


def summary(result: ResurgenceMeasurement) -> str:
    """A few human-readable lines (printed by the CLI)."""
    lines = [f"{k}: {v}" for k, v in result.scalars.items()]
    for j, t in enumerate(result.steps):
        flag = "  [negative-curvature directions dominate]" if result.negative_dominated[j] else ""
        parts = [f"predicted_rho={result.predicted_rho[j]:.4g}", f"rho={result.rho[j]:.4g}"]
        for i, name in enumerate(result.readout_names):
            if name != "rho" and result.predicted_readouts is not None:
                parts.append(f"predicted_{name}={result.predicted_readouts[i, j]:.4g}")
                parts.append(f"{name}={result.measured_readouts[i, j]:.4g}")
        lines.append(f"T={int(t)}: " + " ".join(parts) + flag)
    lines.append(
        "principal_angles (rad): " + json.dumps(np.round(result.principal_angles, 4).tolist())
    )
    return "\n".join(lines)
