r"""Forget displacement, forget / fine-tuning subspaces, overlaps, and the law's prediction.

Names follow theory.md s.4: ``principal_angles``, ``spectral_weights``, ``predicted_rho``,
``rho``, ``forget_loss_recovery``. The prediction calls the theory's resurgence law
(:mod:`theory.law`); nothing here re-implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bridge.groups import ParameterGroup

__all__ = [
    "Prediction",
    "finetune_gradient_subspace",
    "forget_displacement",
    "forget_loss_recovery",
    "gradient_forget_subspace",
    "layerwise_forget_subspace",
    "measured_rho",
    "negative_curvature_share",
    "predicted_rho",
    "principal_angles",
    "spectral_weights",
]


def forget_displacement(base, unlearned, group: ParameterGroup) -> torch.Tensor:
    r"""Unlearning displacement :math:`\delta = \theta_u - \theta_0` over a group, flat ``(n,)``.

    Args:
      base: UNet at theta_0. unlearned: UNet at theta_u (same architecture). group: the group.

    Returns:
      delta in the base's dtype and device.
    """
    ref = group.values(base)
    return group.values(unlearned).to(ref.device, ref.dtype) - ref


def layerwise_forget_subspace(
    delta: torch.Tensor, group: ParameterGroup, *, rank: int = 1, rtol: float = 1e-6
) -> torch.Tensor:
    r"""Orthonormal basis of the forget subspace from each layer's top singular vectors of delta.

    For a weight ``W`` of the group with :math:`\delta W = \sum_j s_j u_j v_j^\top`, the basis
    gets the flat embedding of :math:`u_j v_j^\top` (unit Frobenius norm, zero elsewhere) for the
    top ``rank`` singular values above ``rtol * s_1``. Bias-like 1-D tensors contribute their
    normalised delta. Different layers have disjoint supports, so the columns are orthonormal.

    Args:
      delta: flat displacement ``(n,)``. group: its group. rank: singular triples per layer.
      rtol: relative cut on singular values (drops layers the method did not edit).

    Returns:
      Basis ``(n, r)``, r <= rank * (number of tensors).

    Raises:
      ValueError: if delta is zero (nothing was unlearned in this group).
    """
    columns = []
    offset = 0
    for block, shape in zip(torch.split(delta, group.sizes()), group.shapes, strict=True):
        size = block.numel()
        mat = block.reshape(shape[0], -1) if len(shape) > 1 else block.reshape(1, -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        keep = [j for j in range(min(rank, s.numel())) if s[j] > rtol * s[0] and s[0] > 0]
        for j in keep:
            col = torch.zeros_like(delta)
            col[offset : offset + size] = torch.outer(u[:, j], vh[j]).reshape(-1)
            columns.append(col)
        offset += size
    if not columns:
        raise ValueError(f"delta is zero over group {group.spec!r}: the unlearning did not edit it")
    return torch.stack(columns, dim=1)


def _top_left_singular(columns: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``(n, m)``: randomized SVD when m is large."""
    rank = min(rank, *columns.shape)
    if min(columns.shape) <= 4 * rank:
        u, _, _ = torch.linalg.svd(columns, full_matrices=False)
        return u[:, :rank]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(columns, q=rank + 8, niter=4)
    return u[:, :rank]


def gradient_forget_subspace(
    forget_loss, theta0: torch.Tensor, *, rank: int = 4, seed: int = 0
) -> torch.Tensor:
    """Forget subspace as the span of per-batch forget-loss gradients at theta_0.

    Args:
      forget_loss: :class:`~bridge.loss.FrozenDiffusionLoss` on the forget prompts (denoising
        target; a teacher target from theta_0 has zero gradient there).
      theta0: flat base parameters ``(n,)``. rank: basis size. seed: randomized-SVD seed.

    Returns:
      Orthonormal basis ``(n, r)``, r = min(rank, number of batches).
    """
    grads = forget_loss.batch_gradients(theta0)
    return _top_left_singular(grads.T, rank, seed)


def finetune_gradient_subspace(
    finetune_loss, theta_u: torch.Tensor, *, rank: int = 4, seed: int = 0
) -> torch.Tensor:
    """Fine-tuning gradient subspace: top singular vectors of per-batch gradients at theta_u.

    Args:
      finetune_loss: :class:`~bridge.loss.FrozenDiffusionLoss` on the fine-tuning set.
      theta_u: flat unlearned parameters ``(n,)``. rank: basis size. seed: randomized-SVD seed.

    Returns:
      Orthonormal basis ``(n, r)``, r = min(rank, number of batches).
    """
    grads = finetune_loss.batch_gradients(theta_u)
    return _top_left_singular(grads.T, rank, seed)


def principal_angles(a, b) -> np.ndarray:
    """Principal angles between span(a) and span(b), ascending, in radians.

    Args:
      a: ``(n, p)`` and b: ``(n, q)``, any full-column-rank bases (torch or numpy).

    Returns:
      ``(min(p, q),)`` angles in [0, pi/2], smallest first (``scipy.linalg.subspace_angles``
      returns the same set, largest first).
    """
    import jax

    from theory.observables import principal_angles as theory_principal_angles

    a64 = np.asarray(torch.as_tensor(a).detach().cpu().double())
    b64 = np.asarray(torch.as_tensor(b).detach().cpu().double())
    # The theory's definition (arcsin near 0, where arccos loses digits), in float64.
    with jax.enable_x64(True):
        return np.asarray(theory_principal_angles(a64, b64))


def spectral_weights(eigenvectors, delta) -> np.ndarray:
    r"""Weights :math:`\langle v_i, \delta/\|\delta\|\rangle^2` of delta on eigenvectors.

    Args:
      eigenvectors: orthonormal ``(n, k)``. delta: ``(n,)``.

    Returns:
      ``(k,)`` weights in [0, 1]; they sum to <= 1 (= 1 for a complete basis).
    """
    d = np.asarray(torch.as_tensor(delta).detach().cpu().double())
    coords = np.asarray(eigenvectors, dtype=np.float64).T @ (d / np.linalg.norm(d))
    return coords**2


def measured_rho(theta_t: torch.Tensor, theta_u: torch.Tensor, delta: torch.Tensor) -> float:
    r"""Parameter-space resurgence :math:`-\langle\theta_T-\theta_u,\delta\rangle/\|\delta\|^2`."""
    d = delta.double()
    return float(-((theta_t.double() - theta_u.double()) @ d) / (d @ d))


def forget_loss_recovery(loss_u: float, loss_t: float, loss_0: float) -> float:
    r"""(L_f(theta_u) - L_f(theta_T)) / (L_f(theta_u) - L_f(theta_0)); 1 = forget loss recovered.

    Raises:
      ValueError: if L_f(theta_u) == L_f(theta_0) (unlearning did not change the forget loss).
    """
    if loss_u == loss_0:
        raise ValueError(
            f"`forget_loss_recovery` is undefined: the forget loss is {loss_u!r} at both theta_u "
            "and theta_0 (the unlearning did not change it)."
        )
    return (loss_u - loss_t) / (loss_u - loss_0)


def negative_curvature_share(contributions, curvatures) -> np.ndarray:
    r"""Share of the law's absolute total carried by its negative-curvature terms.

    The law is a sum of signed terms :math:`c_j(T)`: each eigen-term
    :math:`a_i(T)\,g_i\,\delta_i/\|\delta\|^2` and the closure term
    :math:`a(\lambda_\perp, T)\,\langle g_\perp, \delta\rangle/\|\delta\|^2`. Term j is a
    negative-curvature term when its curvature :math:`\kappa_j` (the eigenvalue, or the closure's
    Rayleigh quotient :math:`\lambda_\perp`) is < 0. The rule:

    .. math:: s(T) = \frac{\sum_{j:\,\kappa_j<0} |c_j(T)|}{\sum_j |c_j(T)|}, \qquad
              \text{negative curvature dominates at } T \iff s(T) > 1/2,

    with s = 0 where every term is zero (T = 0). Magnitudes are taken per term, so negative-
    curvature terms that cancel each other still count as what the prediction rests on.

    Args:
      contributions: ``(S, m)`` signed terms c_j(T) (their sum over j is rho(T)).
      curvatures: ``(m,)`` curvature of each term (units of the loss per parameter squared).

    Returns:
      ``(S,)`` shares in [0, 1].

    >>> negative_curvature_share(np.array([[1.0, 5.0, -4.6]]), np.array([1.0, -0.5, -0.6]))
    array([0.90566038])
    """
    size = np.abs(np.asarray(contributions, dtype=np.float64))
    negative = size[:, np.asarray(curvatures) < 0].sum(axis=1)
    total = size.sum(axis=1)
    return np.where(total > 0, negative / np.where(total > 0, total, 1.0), 0.0)


@dataclass(frozen=True)
class Prediction:
    """The theory's truncated prediction rho_k(T) with its inputs and diagnostics.

    Attributes:
      predicted_rho: ``(S,)`` rho_k at each step count.
      steps: ``(S,)`` step counts T. lr: GD step size.
      negative_dominated: ``(S,)`` ``negative_share > 1/2`` (negative curvature dominates).
      negative_share: ``(S,)`` see :func:`negative_curvature_share`.
      contributions: ``(S, k + 1)`` signed terms of the law: the k eigen-terms, then the closure
        term; each row sums to ``predicted_rho``.
      curvatures: ``(k + 1,)`` the eigenvalues, then ``lambda_perp``.
      lambda_perp: curvature of the remainder direction g_perp.
      grad_coords, delta_coords: ``(k,)`` <g, v_i> and <delta, v_i>.
    """

    predicted_rho: np.ndarray
    steps: np.ndarray
    lr: float
    negative_dominated: np.ndarray
    negative_share: np.ndarray
    contributions: np.ndarray
    curvatures: np.ndarray
    lambda_perp: float
    grad_coords: np.ndarray
    delta_coords: np.ndarray


def predicted_rho(
    eigenvalues, eigenvectors, hessian_matvec, grad, delta, *, lr: float, steps: Sequence[int]
) -> Prediction:
    """rho_k(T) by the theory's truncated closure (``theory.law``), from measured quantities.

    Runs the JAX law on the CPU in float64 (``jax.enable_x64``) with NumPy inputs.

    Args:
      eigenvalues: ``(k,)`` measured Hessian eigenvalues (both ends allowed).
      eigenvectors: ``(n, k)`` orthonormal. hessian_matvec: numpy ``(n,) -> (n,)`` H v
        (one product, for lambda_perp). grad: fine-tuning gradient at theta_u ``(n,)``.
      delta: forget displacement ``(n,)``. lr: GD step size. steps: step counts T.

    Returns:
      :class:`Prediction`.
    """
    import jax

    from theory.law import gd_amplification, predict_rho_truncated, truncated_closure_inputs

    def as64(x):
        return np.asarray(
            torch.as_tensor(x).detach().cpu().double() if not isinstance(x, np.ndarray) else x,
            dtype=np.float64,
        )

    lam, vecs, g, d = as64(eigenvalues), as64(eigenvectors), as64(grad), as64(delta)
    t = np.asarray(list(steps), dtype=np.int64)
    with jax.enable_x64(True):
        inputs = truncated_closure_inputs(
            lam, vecs, lambda v: as64(hessian_matvec(np.asarray(v))), g, d
        )
        inputs = {key: np.asarray(val, dtype=np.float64) for key, val in inputs.items()}
        rho = np.asarray(predict_rho_truncated(lr=lr, steps=t, **inputs), dtype=np.float64)
        # The law's terms: a_i(T) g_i d_i / ||d||^2 per eigenpair, then the closure term.
        curvatures = np.append(inputs["eigenvalues"], inputs["lambda_perp"])
        coef = np.append(
            inputs["grad_coords"] * inputs["delta_coords"], inputs["grad_perp_dot_delta"]
        )
        amp = np.asarray(gd_amplification(curvatures, lr, t), dtype=np.float64)
        terms = amp * coef / inputs["delta_norm_sq"]
    share = negative_curvature_share(terms, curvatures)
    return Prediction(
        predicted_rho=rho,
        steps=t,
        lr=float(lr),
        negative_dominated=share > 0.5,
        negative_share=share,
        contributions=terms,
        curvatures=curvatures,
        lambda_perp=float(inputs["lambda_perp"]),
        grad_coords=inputs["grad_coords"],
        delta_coords=inputs["delta_coords"],
    )
