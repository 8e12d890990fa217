r"""Resurgence audit before release: which fine-tuning sets would bring the concept back (issue 13).

For each candidate fine-tuning set, one curvature measurement of its loss at theta_u
(:func:`bridge.local_curvature.measure_local_curvature` on the same probes, readouts and
operators as the testbed pipeline, :mod:`bridge.testbed.predict`) and the law of theory.md s.4b
over an lr x T grid:

.. math:: \Delta R(T) = -\sum_i a_i(T)\,\langle g, v_i\rangle\,\langle v_i, \nabla R\rangle
          - a(\lambda_\perp, T)\,\langle g_\perp, \nabla R\rangle ,

with the three factors of each term reported per direction: the **gradient overlap**
:math:`\langle g, v_i\rangle` (how much the candidate's fine-tuning gradient points along v_i),
the **forget overlap** :math:`\langle v_i, \nabla R\rangle` (how much v_i moves the forget
readout) and the **curvature amplification** :math:`a_i(T) = (1 - (1 - \eta\lambda_i)^T)/
\lambda_i` (:func:`theory.law.gd_amplification`). Readout gradients at theta_u do not depend on
the fine-tuning set, so they are computed once for all candidates; each candidate costs its
eigenpairs (both spectrum ends) plus, when ``max(steps) <= krylov_max``, one Lanczos run at g of
depth max(steps), which makes the prediction exact on the local quadratic model (otherwise the
eigenpairs + closure predictor). Predicted presence is presence generated at
theta_u + Delta theta_pred(T) (:func:`bridge.predict.predict_at_points`).

Candidates are ranked by the predicted value of one readout at a reference (lr, T): predicted
presence when a classifier is given, else ``output_rho``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bridge.curvature import HessianOperator
from bridge.ggn import GGNOperator
from bridge.hygiene import check_group_covers_edit
from bridge.local_curvature import LocalCurvature, measure_local_curvature, numpy_matvec
from bridge.loss import FrozenDiffusionLoss, ProbeBatch
from bridge.predict import ReadoutPrediction, predict_at_points, predict_readouts
from bridge.probes import Probes, SamplerProbe, finetune_probes
from bridge.readouts import ReadoutSet
from bridge.spectra import spectrum_ends, top_eigenpairs

__all__ = [
    "AuditReport",
    "Candidate",
    "CandidateAudit",
    "Direction",
    "audit",
    "audit_markdown",
    "load_candidates",
    "plot_audit",
]


@dataclass(frozen=True)
class Candidate:
    """One candidate fine-tuning set: model-space images ``(N, C, H, W)`` and N captions, or
    ready frozen ``probes`` (then images and captions are ignored)."""

    name: str
    images: torch.Tensor | None = None
    captions: tuple[str, ...] = ()
    probes: tuple[ProbeBatch, ...] = ()

    def __post_init__(self) -> None:
        if not self.probes and (self.images is None or len(self.images) != len(self.captions)):
            n = 0 if self.images is None else len(self.images)
            raise ValueError(
                f"candidate {self.name!r}: {n} images but {len(self.captions)} captions; give "
                "one caption per image (or frozen probe batches)."
            )


def load_candidates(folders: Sequence[str | Path], *, size: int) -> list[Candidate]:
    """Caption folders (:mod:`bridge.data`) as candidates named by folder, checked first.

    Raises:
      ValueError: no folders, or a folder whose images and captions do not match (one line,
        naming the folder).
    """
    from bridge.data import check_caption_folder, load_caption_folder

    if not folders:
        raise ValueError("no candidate fine-tuning sets: give at least one caption folder.")
    for folder in folders:  # every folder's layout before any image is decoded
        try:
            check_caption_folder(folder)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"candidate {str(folder)!r}: {err}") from None
    out = []
    for folder in folders:
        found = load_caption_folder(folder, size=size)
        out.append(Candidate(Path(folder).name, found.images, tuple(found.captions)))
    return out


@dataclass(frozen=True)
class Direction:
    """One term of the law at the reference (lr, T): the three factors and their product.

    ``contribution = -amplification * gradient_overlap * forget_overlap`` (readout units)."""

    index: int
    eigenvalue: float
    gradient_overlap: float
    forget_overlap: float
    amplification: float
    contribution: float


@dataclass(frozen=True)
class CandidateAudit:
    """The audit of one candidate.

    Attributes:
      name: candidate name. size: its number of samples (probe rows).
      prediction: first-order :class:`~bridge.predict.ReadoutPrediction` ``(N, R, S)``.
      at_points: readout -> ``(R, S)`` evaluated at the predicted parameters (presence).
      directions: the top terms at the reference point, largest |contribution| first.
      closure: the closure term's contribution (the rest of the gradient, one direction).
      score: the ranking readout's predicted value at the reference point.
      predictor: ``krylov`` (exact on the quadratic model) or ``closure``.
      lambda_max: largest eigenvalue measured. hvps: products per part. seconds: wall time.
    """

    name: str
    size: int
    prediction: ReadoutPrediction
    at_points: dict[str, np.ndarray]
    directions: tuple[Direction, ...]
    closure: float
    score: float
    predictor: str
    lambda_max: float
    hvps: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class AuditReport:
    """Every candidate's audit and their ranking (highest predicted resurgence first)."""

    candidates: tuple[CandidateAudit, ...]
    ranking: tuple[str, ...]
    rank_by: str
    reference: tuple[float, int]
    group_spec: str
    curvature: str
    readout_seconds: float
    values_u: dict[str, float] = field(default_factory=dict)

    def get(self, name: str) -> CandidateAudit:
        """The audit of candidate ``name``."""
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict:
        """JSON-able summary (predictions as nested lists)."""

        def one(c: CandidateAudit) -> dict:
            return {
                "name": c.name,
                "size": c.size,
                "score": c.score,
                "predictor": c.predictor,
                "lambda_max": c.lambda_max,
                "hvps": c.hvps,
                "seconds": round(c.seconds, 3),
                "predicted": {n: c.prediction.get(n).tolist() for n in c.prediction.names},
                "predicted_at_points": {k: v.tolist() for k, v in c.at_points.items()},
                "directions": [d.__dict__ for d in c.directions],
                "closure": c.closure,
            }

        return {
            "ranking": list(self.ranking),
            "rank_by": self.rank_by,
            "reference": {"lr": self.reference[0], "steps": self.reference[1]},
            "group": self.group_spec,
            "curvature": self.curvature,
            "values_unlearned": self.values_u,
            "readout_gradient_seconds": round(self.readout_seconds, 3),
            "lrs": self.candidates[0].prediction.lrs.tolist(),
            "steps": self.candidates[0].prediction.steps.tolist(),
            "candidates": [one(c) for c in self.candidates],
        }


def _measure(op, curvature: str, *, top_k: int, depth: int | None, tol: float, seed: int):
    """g, the Krylov run at g (if ``depth``) and the eigenpairs + closure, at tolerance ``tol``.

    The GGN is PSD, so only its top end is computed (its bottom end is a cluster at 0 that
    Lanczos cannot resolve and the law does not need); the Hessian gets both ends.
    """
    curv = measure_local_curvature(op, krylov_depth=depth or 1, seed=seed)
    before = op.num_matvecs
    if curvature == "ggn":
        ends = top_eigenpairs(op, top_k, tol=tol, seed=seed)
    else:
        ends = spectrum_ends(op, top_k, tol=tol, seed=seed)
    eig_hvps = op.num_matvecs - before
    vecs = np.asarray(ends.eigenvectors, dtype=np.float64)
    g_perp = curv.gradient - vecs @ (vecs.T @ curv.gradient)
    norm_sq = float(g_perp @ g_perp)
    lam_perp = float(g_perp @ numpy_matvec(op)(g_perp)) / norm_sq if norm_sq > 0 else 0.0
    hvps = {"krylov": curv.hvps["krylov"], "eigenpairs": eig_hvps, "closure": 1}
    return dataclasses.replace(
        curv,
        eigenvalues=np.asarray(ends.eigenvalues, dtype=np.float64),
        eigenvectors=vecs,
        eigen_converged=bool(ends.converged),
        lambda_perp=lam_perp,
        krylov=curv.krylov if depth else None,
        hvps=hvps,
    )


def _directions(curv: LocalCurvature, readout: np.ndarray, lr: float, steps: int, top: int):
    """The law's terms along each measured eigenvector and the closure, at (lr, T)."""
    import jax

    from theory.law import gd_amplification

    vecs = curv.eigenvectors
    g_coords = vecs.T @ curv.gradient
    r_coords = vecs.T @ readout
    with jax.enable_x64(True):
        curvatures = np.append(curv.eigenvalues, curv.lambda_perp)
        amp = np.asarray(gd_amplification(curvatures, lr, np.array([steps])), np.float64)[0]
    terms = -amp[:-1] * g_coords * r_coords
    g_perp = curv.gradient - vecs @ g_coords
    closure = float(-amp[-1] * (g_perp @ readout))
    order = np.argsort(-np.abs(terms))[:top]
    dirs = tuple(
        Direction(int(i), float(curv.eigenvalues[i]), float(g_coords[i]), float(r_coords[i]),
                  float(amp[i]), float(terms[i]))  # fmt: skip
        for i in order
    )
    return dirs, closure


def audit(
    base,
    unlearned,
    text_encoder,
    scheduler,
    candidates: Sequence[Candidate],
    *,
    forget_batches: Sequence[ProbeBatch],
    lrs: Sequence[float],
    steps: Sequence[int],
    group: str = "cross-attn",
    sampler: SamplerProbe | None = None,
    log_probs=None,
    concept: int | None = None,
    curvature: Literal["ggn", "hessian"] = "ggn",
    top_k: int = 8,
    eigen_tol: float = 1e-4,
    krylov_max: int = 64,
    probe_batch: int = 16,
    rank_by: str | None = None,
    reference: tuple[float, int] | None = None,
    top_directions: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> AuditReport:
    """Predict, for each candidate fine-tuning set, how much of the erased concept returns.

    Args:
      base, unlearned: UNets at theta_0 and theta_u. text_encoder, scheduler: the pipeline's.
      candidates: :class:`Candidate` list (:func:`load_candidates` for caption folders).
      forget_batches: frozen probe batches of the erased concept (target eps).
      lrs: GD step sizes ``(R,)`` (absolute: the planned fine-tuning's). steps: T ``(S,)``.
      group: fine-tuned parameter group (must cover the edit).
      sampler, log_probs, concept: presence (the erased prompt's sampler and a differentiable
        classifier ``images -> (m, K)`` log-probabilities with the erased class index).
      curvature: ``"ggn"`` (linearised network, PSD: no spurious growth along negative
        curvature; the testbed's headline) or ``"hessian"``.
      top_k: eigenpairs per spectrum end (the GGN's top end only). eigen_tol: their Lanczos
        residual tolerance relative to the spectral norm (1e-4: attribution needs no more).
        krylov_max: largest max(steps) for which the exact
        Krylov run (max(steps) products) is added. probe_batch: samples per probe batch.
      rank_by: readout to rank by (default ``presence`` with a classifier, else ``output_rho``).
      reference: (lr, T) of the ranking and the directions (default ``(lrs[0], max(steps))``).
      top_directions: terms reported per candidate. seed: probes' and Lanczos' seed.

    Returns:
      :class:`AuditReport`.

    Raises:
      ValueError: no candidates, a group that misses the edit, an unknown ``rank_by``, a
        reference outside the grid (one line each).
    """
    if not candidates:
        raise ValueError("no candidate fine-tuning sets: give at least one to audit.")
    lrs = [float(x) for x in lrs]
    steps = [int(s) for s in steps]
    reference = reference or (lrs[0], max(steps))
    if reference[0] not in lrs or reference[1] not in steps:
        raise ValueError(f"`reference` {reference} must be an (lr, T) of the grid {lrs} x {steps}.")
    group_ = check_group_covers_edit(base, unlearned, group)
    t0 = time.time()
    shared = Probes(finetune=[], forget=list(forget_batches), sampler=sampler, seed=seed)
    readouts = ReadoutSet(base, unlearned, group_, shared, log_probs=log_probs, concept=concept)
    grads = readouts.gradients()
    readout_seconds = time.time() - t0
    rank_by = rank_by or ("presence" if "presence" in grads.names else "output_rho")
    if rank_by not in grads.names:
        raise ValueError(f"`rank_by` must be one of {list(grads.names)}, got {rank_by!r}.")
    at_names = tuple(n for n in ("presence",) if n in grads.names)
    r_i, s_i = lrs.index(reference[0]), steps.index(reference[1])
    audits = []
    for cand in candidates:
        t1 = time.time()
        batches = list(cand.probes) or finetune_probes(
            text_encoder, list(cand.captions), cand.images, alphas_cumprod=scheduler.alphas_cumprod,
            batch_size=probe_batch, seed=seed,
        )  # fmt: skip
        loss = FrozenDiffusionLoss(unlearned, group_, batches)
        op = (GGNOperator if curvature == "ggn" else HessianOperator)(loss, progress=progress)
        depth = max(steps) if max(steps) <= krylov_max else None
        curv = _measure(op, curvature, top_k=top_k, depth=depth, tol=eigen_tol, seed=seed)
        predictor = "krylov" if depth is not None else "closure"
        pred = predict_readouts(curv, grads, lrs=lrs, steps=steps, predictor=predictor)
        points = (
            predict_at_points(readouts, curv, lrs=lrs, steps=steps, names=at_names,
                              predictor=predictor)  # fmt: skip
            if at_names
            else {}
        )
        dirs, closure = _directions(
            curv, grads.gradient(rank_by), reference[0], reference[1], top_directions
        )
        table = points if rank_by in points else {rank_by: pred.get(rank_by)}
        audits.append(
            CandidateAudit(
                name=cand.name,
                size=sum(len(b.noisy) for b in batches),
                prediction=pred,
                at_points=points,
                directions=dirs,
                closure=closure,
                score=float(table[rank_by][r_i, s_i]),
                predictor=predictor,
                lambda_max=curv.lambda_max,
                hvps=dict(curv.hvps),
                seconds=time.time() - t1,
            )
        )
    ranking = tuple(c.name for c in sorted(audits, key=lambda c: -c.score))
    return AuditReport(
        candidates=tuple(audits),
        ranking=ranking,
        rank_by=rank_by,
        reference=(reference[0], reference[1]),
        group_spec=group_.spec,
        curvature=curvature,
        readout_seconds=readout_seconds,
        values_u=dict(zip(grads.names, grads.values.tolist(), strict=True)),
    )


def audit_markdown(report: AuditReport) -> str:
    """The audit as Markdown: the ranking, then each candidate's top directions and its cost."""
    lr, steps = report.reference
    names = report.candidates[0].prediction.names
    r_i = list(report.candidates[0].prediction.lrs).index(lr)
    s_i = list(report.candidates[0].prediction.steps).index(steps)
    lines = [
        "# Resurgence audit",
        "",
        f"Ranked by predicted `{report.rank_by}` after T = {steps} GD steps at lr = {lr:.4g} "
        f"(group `{report.group_spec}`, {report.curvature} curvature). Values at theta_u: "
        + ", ".join(f"`{k}` = {v:.4g}" for k, v in report.values_u.items())
        + ".",
        "",
        "| rank | candidate | samples | "
        + " | ".join(f"predicted {n}" for n in names)
        + (" | predicted presence (at points)" if report.candidates[0].at_points else "")
        + " | predictor | HVPs | seconds |",
        "|" + " --- |" * (6 + len(names) + bool(report.candidates[0].at_points)),
    ]
    for rank, name in enumerate(report.ranking, 1):
        c = report.get(name)
        vals = " | ".join(f"{c.prediction.get(n)[r_i, s_i]:.4g}" for n in names)
        pts = f" | {c.at_points['presence'][r_i, s_i]:.4g}" if c.at_points else ""
        lines.append(
            f"| {rank} | {name} | {c.size} | {vals}{pts} | {c.predictor} | "
            f"{sum(c.hvps.values())} | {c.seconds:.1f} |"
        )
    lines += [
        "",
        f"Readout gradients (shared by every candidate): {report.readout_seconds:.1f} s.",
        "",
        "## Where the resurgence comes from",
        "",
        f"Each term of the law for `{report.rank_by}` is (gradient overlap <g, v_i>) x (forget "
        "overlap <v_i, grad R>) x (curvature amplification a_i(T)), with a minus sign; the "
        "closure term carries the gradient outside the measured eigenvectors.",
    ]
    for name in report.ranking:
        c = report.get(name)
        lines += [
            "",
            f"### {name}",
            "",
            "| i | lambda_i | gradient overlap | forget overlap | amplification | contribution |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for d in c.directions:
            lines.append(
                f"| {d.index} | {d.eigenvalue:.4g} | {d.gradient_overlap:.4g} | "
                f"{d.forget_overlap:.4g} | {d.amplification:.4g} | {d.contribution:.4g} |"
            )
        lines.append(f"| closure | | | | | {c.closure:.4g} |")
    return "\n".join(lines) + "\n"


def plot_audit(report: AuditReport, path: str | Path) -> Path:
    """Left: the ranking readout predicted over T per candidate (at the reference lr); right:
    each candidate's top contributions at the reference point, stacked, with the closure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr, steps = report.reference
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    first = report.candidates[0].prediction
    r_i = list(first.lrs).index(lr)
    for name in report.ranking:
        c = report.get(name)
        curve = (c.at_points if report.rank_by in c.at_points else {})
        values = curve.get(report.rank_by, c.prediction.get(report.rank_by))[r_i]
        ax.plot(first.steps, values, marker="o", label=name)
    ax.set_xlabel("fine-tuning steps T")
    ax.set_ylabel(f"predicted {report.rank_by}")
    ax.set_title(f"Predicted {report.rank_by} per candidate (lr = {lr:.3g})")
    ax.legend(fontsize=8)
    x = np.arange(len(report.ranking))
    for j, name in enumerate(report.ranking):
        c = report.get(name)
        bottom_pos = bottom_neg = 0.0
        for k, part in enumerate([d.contribution for d in c.directions] + [c.closure]):
            base_ = bottom_pos if part >= 0 else bottom_neg
            colour = "0.6" if k == len(c.directions) else plt.cm.tab10(k % 10)
            bx.bar(j, part, bottom=base_, color=colour, edgecolor="k", linewidth=0.3)
            if part >= 0:
                bottom_pos += part
            else:
                bottom_neg += part
    bx.axhline(0, color="k", linewidth=0.5)
    bx.set_xticks(x, report.ranking, rotation=30, ha="right", fontsize=8)
    bx.set_ylabel(f"first-order change of {report.rank_by}")
    bx.set_title(f"Top terms of the law at T = {steps} (grey: closure)")
    fig.suptitle("Resurgence audit: candidates ranked by predicted resurgence")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
