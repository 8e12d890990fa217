r"""Predictions of every readout for every (lr, T) from one curvature measurement (pipeline step 4).

Pure: :func:`predict_readouts` and :func:`predict_displacement` combine a
:class:`~bridge.local_curvature.LocalCurvature` with :class:`~bridge.readouts.ReadoutGradients`
through the theory's law (``theory.law``, ``theory.krylov``) and never touch the Hessian again, so
an lr x T grid costs no Hessian-vector product. Three predictors of GD on the local quadratic model,

.. math:: \Delta R(T) = \langle\nabla R(\theta_u), \theta_T - \theta_u\rangle
          = -\langle \nabla R, a(H, T)\, g\rangle :

* ``krylov``: theta_T - theta_u = -||g|| V_m a(T_m, T) e_1 from one Lanczos run at g, exact for
  T <= m (any sign of curvature), the same run for every readout;
* ``quadrature``: Gauss quadrature on the two polarisation runs of each readout, exact for
  T <= 2m;
* ``closure``: the top-k eigenpairs at both ends plus the closure direction g_perp (theory.md
  s.4), approximate; it converges to the others as k grows.

:func:`predict_at_points` evaluates readouts at the predicted parameters theta_u + Delta theta(T)
(predicted presence: the UNet generates from the same seeds); it runs the UNet, never its Hessian.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bridge.local_curvature import LocalCurvature, check_krylov_depth
from bridge.readouts import ReadoutGradients, ReadoutSet
from bridge.subspaces import negative_curvature_share

__all__ = [
    "PREDICTORS",
    "ReadoutPrediction",
    "check_same_seeds",
    "predict_at_points",
    "predict_displacement",
    "predict_readouts",
]

Predictor = Literal["krylov", "quadrature", "closure"]
#: The three predictors (see the module docstring); ``krylov`` and ``quadrature`` are exact.
PREDICTORS: tuple[str, ...] = Predictor.__args__


@dataclass(frozen=True)
class ReadoutPrediction:
    """Predicted readouts over a (readout, lr, step) grid.

    Attributes:
      names: readout names ``(N,)``. lrs: GD step sizes ``(R,)``. steps: GD step counts ``(S,)``.
      change: ``(N, R, S)`` predicted Delta R(T). values_u: ``(N,)`` R(theta_u).
      predictor: one of :data:`PREDICTORS`.
      negative_share: ``(N, R, S)`` share of the closure law's absolute total carried by
        negative-curvature terms (:func:`bridge.subspaces.negative_curvature_share`); None for
        the Krylov predictors.
      seeds: sampler seeds of the readouts (must match the measurement's).
    """

    names: tuple[str, ...]
    lrs: np.ndarray
    steps: np.ndarray
    change: np.ndarray
    values_u: np.ndarray
    predictor: str
    negative_share: np.ndarray | None = None
    seeds: tuple[int, ...] = ()

    @property
    def predicted(self) -> np.ndarray:
        """``(N, R, S)`` predicted values R(theta_u) + Delta R(T)."""
        return self.values_u[:, None, None] + self.change

    def get(self, name: str) -> np.ndarray:
        """``(R, S)`` predicted values of readout ``name``."""
        return self.predicted[self.names.index(name)]


def _check_predictor(predictor: str) -> None:
    if predictor not in PREDICTORS:
        raise ValueError(f"`predictor` must be one of {list(PREDICTORS)}, got {predictor!r}.")


def _run_depth_ok(run, steps, factor, argument, exact) -> None:
    if exact and not run.invariant:
        check_krylov_depth(run.matvecs, steps, factor=factor, argument=argument)


def _closure_parts(curv: LocalCurvature):
    if curv.eigenvalues is None:
        raise ValueError("`predictor='closure'` needs eigenpairs: measure with `top_k`.")
    vecs = curv.eigenvectors
    g_coords = vecs.T @ curv.gradient
    return vecs, g_coords, curv.gradient - vecs @ g_coords


def predict_displacement(
    curv: LocalCurvature,
    *,
    lr: float,
    steps: Sequence[int],
    predictor: Predictor = "krylov",
    exact: bool = True,
) -> np.ndarray:
    r"""Predicted theta_T - theta_u of GD, ``(S, n)`` float64 (``krylov`` or ``closure``).

    ``closure``: :math:`-\sum_i a_i(T) g_i v_i - a(\lambda_\perp, T)\, g_\perp`.

    Raises:
      ValueError: the part the predictor needs was not measured, or (``exact``) a Krylov run
        shorter than max(steps).
    """
    import jax

    from theory.krylov import krylov_displacement
    from theory.law import gd_amplification

    _check_predictor(predictor)
    t = np.asarray(list(steps), dtype=np.int64)
    if predictor == "krylov":
        if curv.krylov is None:
            raise ValueError("`predictor='krylov'` needs the run at g: measure with `krylov_depth`.")
        _run_depth_ok(curv.krylov, t, 1, "krylov_depth", exact)
        return krylov_displacement(curv.krylov, lr, t, exact=exact)
    if predictor == "quadrature":
        raise ValueError("Gauss quadrature gives readouts, not the displacement: use 'krylov'.")
    vecs, g_coords, g_perp = _closure_parts(curv)
    curvatures = np.append(curv.eigenvalues, curv.lambda_perp)
    with jax.enable_x64(True):
        amp = np.asarray(gd_amplification(curvatures, lr, t), dtype=np.float64)  # (S, k + 1)
    return -(amp[:, :-1] * g_coords) @ vecs.T - amp[:, -1:] * g_perp[None]


def predict_readouts(
    curv: LocalCurvature,
    grads: ReadoutGradients,
    *,
    lrs: Sequence[float],
    steps: Sequence[int],
    predictor: Predictor = "krylov",
    exact: bool = True,
) -> ReadoutPrediction:
    """Delta R(T) of every readout for every lr and T, from one measurement (no HVP).

    Args:
      curv: the measured local curvature. grads: readout gradients at theta_u.
      lrs: GD step sizes ``(R,)``. steps: step counts ``(S,)``.
      predictor: one of :data:`PREDICTORS`.
      exact: refuse Krylov depths too small for an exact prediction at every T.

    Returns:
      :class:`ReadoutPrediction`.

    Raises:
      ValueError: an unknown predictor, a missing curvature part, gradients over another group,
        or a depth too small (one line, naming ``krylov_depth`` / ``quadrature_depth``).
    """
    import jax

    from theory.krylov import polarised_quadrature
    from theory.law import (
        gd_amplification,
        predict_readout_change_truncated,
        readout_closure_inputs,
    )

    _check_predictor(predictor)
    if grads.group_spec != curv.group_spec or grads.gradients.shape[1] != curv.numel:
        raise ValueError(
            f"readout gradients are over group {grads.group_spec!r} but the curvature over "
            f"{curv.group_spec!r}; measure both on the fine-tuned group."
        )
    t = np.asarray(list(steps), dtype=np.int64)
    lrs = np.asarray(list(lrs), dtype=np.float64)
    n_read = len(grads.names)
    change = np.zeros((n_read, lrs.size, t.size))
    share = None
    if predictor == "krylov":
        for r, lr in enumerate(lrs):
            disp = predict_displacement(curv, lr=lr, steps=t, exact=exact)  # (S, n)
            change[:, r] = (disp @ grads.gradients.T).T
    elif predictor == "quadrature":
        for i, name in enumerate(grads.names):
            if name not in curv.quadrature:
                raise ValueError(
                    f"no polarisation runs for readout `{name}`: pass it in `quadrature`."
                )
            runs = curv.quadrature[name]
            for run in (runs.plus, runs.minus):
                if run is not None:
                    _run_depth_ok(run, t, 2, "quadrature_depth", exact)
            for r, lr in enumerate(lrs):
                change[i, r] = -polarised_quadrature(runs, lr, t, exact=exact)
    else:
        vecs, g_coords, _ = _closure_parts(curv)
        curvatures = np.append(curv.eigenvalues, curv.lambda_perp)
        share = np.zeros_like(change)
        with jax.enable_x64(True):
            for i, u in enumerate(grads.gradients):
                inputs = readout_closure_inputs(vecs, curv.gradient, u)
                inputs = {k: np.asarray(v) for k, v in inputs.items()}
                coef = np.append(g_coords * inputs["readout_coords"], inputs["grad_perp_dot_readout"])
                for r, lr in enumerate(lrs):
                    change[i, r] = predict_readout_change_truncated(
                        curv.eigenvalues,
                        g_coords,
                        inputs["readout_coords"],
                        lr,
                        t,
                        grad_perp_dot_readout=inputs["grad_perp_dot_readout"],
                        lambda_perp=curv.lambda_perp,
                    )
                    terms = np.asarray(gd_amplification(curvatures, lr, t)) * coef
                    share[i, r] = negative_curvature_share(terms, curvatures)
    return ReadoutPrediction(
        names=tuple(grads.names),
        lrs=lrs,
        steps=t,
        change=change,
        values_u=np.asarray(grads.values, dtype=np.float64),
        predictor=predictor,
        negative_share=share,
        seeds=tuple(grads.seeds),
    )


def check_same_seeds(predicted: Sequence[int], measured: Sequence[int]) -> None:
    """Refuse comparing presence generated from different x_T seeds (one line).

    Raises:
      ValueError: the seed lists differ.
    """
    if tuple(predicted) != tuple(measured):
        raise ValueError(
            f"`seeds` differ between prediction ({len(predicted)} seeds from "
            f"{tuple(predicted)[:1]}) and measurement ({len(measured)} from {tuple(measured)[:1]}): "
            "generate both from the same Probes."
        )


def predict_at_points(
    readouts: ReadoutSet,
    curv: LocalCurvature,
    *,
    lrs: Sequence[float],
    steps: Sequence[int],
    names: Sequence[str] = ("presence",),
    predictor: Predictor = "krylov",
    exact: bool = True,
) -> dict[str, np.ndarray]:
    """Readouts evaluated at theta_u + Delta theta_pred(T): e.g. predicted presence.

    The predicted parameters are loaded over the group into the unlearned UNet (functionally;
    the UNet is not modified), images are generated from the sampler's seeds and scored.

    Args:
      readouts: the :class:`ReadoutSet` (its probes fix the seeds). curv: the measurement.
      lrs, steps: the grid. names: readouts to evaluate. predictor: ``krylov`` or ``closure``.
      exact: as in :func:`predict_displacement`.

    Returns:
      name -> ``(R, S)`` values.
    """
    out = {n: np.zeros((len(lrs), len(steps))) for n in names}
    theta_u = readouts.theta_u
    at_u = None  # readouts at theta_u: every lr's zero displacement (T = 0) is evaluated once
    for r, lr in enumerate(lrs):
        disp = predict_displacement(curv, lr=lr, steps=steps, predictor=predictor, exact=exact)
        for s in range(len(steps)):
            step = torch.as_tensor(disp[s]).to(theta_u)
            if not torch.any(step):
                at_u = at_u if at_u is not None else readouts.values(theta_u + step, names)
                values = at_u
            else:
                values = readouts.values(theta_u + step, names)
            for name, value in values.items():
                out[name][r, s] = value
    return out
