r"""Readouts of resurgence beyond rho, exact in the linear model (theory.md section 4b).

A readout R(theta) is any differentiable function of the parameters that a user measures. The law
predicts its change under GD from the same eigenpairs as rho,
Delta R(T) = -sum_i a_i(T) <g, v_i> <v_i, grad R(theta_u)> (:func:`theory.law.predict_readout_change`);
here each readout also has its exact value at any theta, so the first-order prediction can be
checked and the exact GD prediction (evaluate R at the closed-form theta_T) is available.

Readouts (same names on the bridge side), all 0 at theta_u and 1 at theta_0:

- ``rho``: -<theta - theta_u, delta> / ||delta||^2 (linear: the law is exact);
- ``output_rho``: <eps_theta - eps_u, eps_0 - eps_u> / ||eps_0 - eps_u||^2 on the erased prompt's
  data, weighted over noise levels like the loss (linear in theta: exact);
- ``forget_loss_recovery``: (L_f(theta_u) - L_f(theta)) / (L_f(theta_u) - L_f(theta_0)) (quadratic);
- ``sample_shift``: the DDIM-generated mean for the erased prompt moved back towards the
  pretrained one, <mu(theta) - mu_u, mu_0 - mu_u>_{Sigma^-1} / ||mu_0 - mu_u||^2_{Sigma^-1}
  (polynomial in theta through the sampler: first order via autodiff).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.presence import presence
from theory.problem import LinearDiffusionProblem
from theory.quadratic import diffusion_grad, diffusion_loss
from theory.sampling import ddim_affine
from theory.unlearning.targets import prompt_moments

__all__ = ["READOUT_NAMES", "Readouts", "readouts", "presence_readout"]

READOUT_NAMES = ("rho", "output_rho", "forget_loss_recovery", "sample_shift")


class Readouts(NamedTuple):
    """The readouts of one (problem, theta_0, theta_u, forget concept).

    Attributes:
      value: name -> function theta ``(L, d, d+m)`` -> scalar (exact).
      gradient: name -> grad R(theta_u), ``(L, d, d+m)`` (what the law consumes).
    """

    value: dict[str, Callable]
    gradient: dict[str, jax.Array]


def readouts(
    problem: LinearDiffusionProblem, theta_0, theta_u, forget: int, *, check: bool = True
) -> Readouts:
    """Exact readout functions and their gradients at theta_u for erased concept ``forget``.

    The forget data are x_0 ~ N(A c_f, Sigma) under the prompt c_f (no null drop). ``check=False``
    skips the eager normaliser check so that the function can be traced (``jit``/``vmap``).

    Raises:
      ValueError: theta_u equal to theta_0 on some readout's normaliser (nothing was unlearned).
    """
    emb = problem.embeddings[:, forget]
    forget_moments, _ = prompt_moments(problem, emb, problem.concept_means[:, forget])
    schedule = problem.schedule
    weights = schedule.weights
    delta = theta_u - theta_0
    removed = -delta  # theta_0 - theta_u

    def metric_dot(x, y):  # sum_t w_t tr(x_t S_f,t y_t^T): the forget data's output metric
        return jnp.sum(weights * jnp.einsum("lij,ljk,lik->l", x, forget_moments, y))

    output_norm = metric_dot(removed, removed)
    loss_u = diffusion_loss(theta_u, forget_moments, schedule)
    loss_gap = loss_u - diffusion_loss(theta_0, forget_moments, schedule)
    sigma_inv = jnp.linalg.inv(problem.covariance)

    def mean_for_prompt(theta):
        return ddim_affine(problem, theta).prompt_map @ emb

    mu_u, mu_0 = mean_for_prompt(theta_u), mean_for_prompt(theta_0)
    shift_norm = (mu_0 - mu_u) @ sigma_inv @ (mu_0 - mu_u)
    for name, norm in () if not check else (
        ("rho", jnp.sum(delta**2)),
        ("output_rho", output_norm),
        ("forget_loss_recovery", loss_gap),
        ("sample_shift", shift_norm),
    ):
        if not float(jnp.abs(norm)) > 0:
            raise ValueError(
                f"readout `{name}` is undefined: theta_u equals theta_0 on it (normaliser {float(norm)!r}); "
                "nothing was unlearned."
            )

    values = {
        "rho": lambda theta: -jnp.sum((theta - theta_u) * delta) / jnp.sum(delta**2),
        "output_rho": lambda theta: metric_dot(theta - theta_u, removed) / output_norm,
        "forget_loss_recovery": lambda theta: (
            loss_u - diffusion_loss(theta, forget_moments, schedule)
        )
        / loss_gap,
        "sample_shift": lambda theta: (mean_for_prompt(theta) - mu_u) @ sigma_inv @ (mu_0 - mu_u)
        / shift_norm,
    }
    gradients = {
        "rho": -delta / jnp.sum(delta**2),
        "output_rho": weights[:, None, None] * (removed @ forget_moments) / output_norm,
        "forget_loss_recovery": -diffusion_grad(theta_u, forget_moments, schedule) / loss_gap,
        "sample_shift": jax.grad(values["sample_shift"])(theta_u),
    }
    return Readouts(values, gradients)


def presence_readout(problem: LinearDiffusionProblem, forget: int, **presence_kwargs) -> Callable:
    """theta -> presence of concept ``forget`` under its own prompt (fixed Monte-Carlo key)."""
    emb = problem.embeddings[:, forget]
    return lambda theta: presence(problem, theta, emb, forget, **presence_kwargs)
