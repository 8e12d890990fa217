r"""The Adam prediction of theory.md section 4: GD with a fixed diagonal preconditioner.

Adam is not covered by the law exactly. Its early steps are close to preconditioned GD,
theta_{k+1} = theta_k - eta P^{-1} grad L(theta_k), with P = sqrt(v) + eps and v Adam's
(bias-corrected) second-moment estimate; at the first step v = g(theta_u)^2. In the coordinates
y = P^{1/2} theta this is plain GD on the Hessian P^{-1/2} H P^{-1/2}, so the law applies with

.. math:: \rho(T) = \sum_i a(\tilde\lambda_i, T)\,\langle \tilde g, \tilde v_i\rangle
          \langle \tilde v_i, P^{-1/2}\delta\rangle / \|\delta\|^2,
          \quad \tilde g = P^{-1/2} g.

Measured limits (d=8, m=6, L=4, UCE): the prediction equals Adam's first step exactly (at T=1
Adam's update is eta g / (|g| + eps)); after that Adam's v adapts while P stays fixed, and where
g has near-zero entries P^{-1} is huge and fixed-P GD is unstable. The function refuses such
cases (eta max(lambda~) >= 2) instead of returning a diverging number.

The preconditioner mixes the Kronecker blocks, so this path forms the dense Hessian of size
(L d (d+m))^2: meant for the small problems of figures and tests (a few thousand parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from theory.finetune import FinetuneSetup
from theory.law import predict_rho
from theory.problem import NoiseSchedule

__all__ = ["adam_preconditioner", "dense_hessian", "predicted_rho_preconditioned"]

# Above this many parameters the dense eigendecomposition costs more than a minute on a laptop.
_MAX_DENSE_PARAMS = 6000


def adam_preconditioner(grad: jax.Array, eps: float = 1e-8) -> jax.Array:
    """P = |g| + eps: Adam's first-step preconditioner sqrt(v) + eps with v = g^2 (bias-corrected).

    Args:
      grad: g = grad L_ft(theta_u), shape ``(L, d, d+m)``.
      eps: Adam's epsilon.

    Returns:
      Shape ``(L, d, d+m)``, positive.
    """
    return jnp.abs(grad) + eps


def dense_hessian(setup: FinetuneSetup, schedule: NoiseSchedule) -> jax.Array:
    """The fine-tuning Hessian as a dense matrix: block-diag over levels of I_d kron 2 w_t S_t.

    Row-major flattening of theta ``(L, d, d+m)``. Shape ``(L d (d+m), L d (d+m))``.
    """
    blocks = 2.0 * schedule.weights[:, None, None] * setup.moments
    dim = setup.grad.shape[-2]
    eye = jnp.eye(dim, dtype=blocks.dtype)
    return jax.scipy.linalg.block_diag(*[jnp.kron(eye, b) for b in blocks])


def predicted_rho_preconditioned(
    setup: FinetuneSetup, schedule: NoiseSchedule, preconditioner: jax.Array, lr, steps
) -> jax.Array:
    """rho(T) of GD preconditioned by diag(``preconditioner``) (the Adam prediction), shape ``(S,)``.

    Args:
      setup: from :func:`theory.finetune_setup`.
      schedule: the problem's noise schedule (level weights of the Hessian).
      preconditioner: P > 0, parameter-shaped ``(L, d, d+m)`` (see :func:`adam_preconditioner`).
      lr: step size eta of theta_{k+1} = theta_k - eta P^{-1} grad.
      steps: ``(S,)`` step counts.

    Raises:
      ValueError: more than 6,000 parameters (the dense path would be too slow), or
        lr * max(eigenvalue of P^{-1/2} H P^{-1/2}) >= 2 (fixed-P GD diverges: raise eps or lower lr).
    """
    n = setup.grad.size
    if n > _MAX_DENSE_PARAMS:
        raise ValueError(
            f"the preconditioned prediction forms the dense Hessian; {n} parameters is more than "
            f"{_MAX_DENSE_PARAMS}. Use a smaller problem (d, m, L)."
        )
    scale = 1.0 / jnp.sqrt(preconditioner.reshape(-1))
    hessian = scale[:, None] * dense_hessian(setup, schedule) * scale[None, :]
    lam, vecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
    if float(lr) * float(lam[-1]) >= 2.0:
        raise ValueError(
            f"preconditioned GD is unstable: `lr` * lambda_max(P^-1/2 H P^-1/2) = "
            f"{float(lr) * float(lam[-1]):.3g} >= 2. Adam's adaptive second moment keeps it stable, "
            "a fixed preconditioner cannot; increase the preconditioner's eps or lower `lr`."
        )
    grad_coords = vecs.T @ (scale * setup.grad.reshape(-1))
    delta_coords = vecs.T @ (scale * setup.delta.reshape(-1))
    # predict_rho divides by sum(delta_coords^2) = ||P^{-1/2} delta||^2; rescale to ||delta||^2.
    ratio = jnp.sum(delta_coords**2) / jnp.sum(setup.delta**2)
    return predict_rho(lam, grad_coords, delta_coords, lr, steps) * ratio
