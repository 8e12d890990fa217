"""Exact linear conditional diffusion model of concept resurgence (JAX). See theory.md.

Shapes: d image dim, m embedding dim, K concepts, L noise levels; parameters ``theta`` are one
array ``(L, d, d + m)`` = [W_t, V_t] per level.
"""

from theory.finetune import (
    FinetuneSetup,
    GDResult,
    Trajectory,
    check_gd_step_size,
    finetune_gd,
    finetune_setup,
    gd_closed_form,
    predicted_rho_closed_form,
    simulate_finetune,
)
from theory.law import (
    gd_amplification,
    predict_rho,
    predict_rho_truncated,
    truncated_closure_inputs,
)
from theory.observables import (
    curvature_along_delta,
    forget_loss_recovery,
    principal_angles,
    rho,
    spectral_weights,
)
from theory.preconditioned import adam_preconditioner, predicted_rho_preconditioned
from theory.presence import clip_score, incidental_presence_matrix, presence
from theory.pretrain import bayes_optimal_denoiser, pretrain_by_steps, pretrain_closed_form
from theory.problem import (
    DataDistribution,
    LinearDiffusionProblem,
    NoiseSchedule,
    concept_distribution,
    make_embeddings,
    make_noise_schedule,
    make_problem,
    new_concept_distribution,
    problem_from_arrays,
)
from theory.quadratic import (
    HessianEigen,
    diffusion_grad,
    diffusion_loss,
    eigen_coordinates,
    from_eigen_coordinates,
    hessian_eigen,
    hessian_matvec,
    join_params,
    second_moments,
    split_params,
    target_moments,
)
from theory.report import StageReport, stage_report
from theory.sampling import (
    DDIMMap,
    GeneratedDistribution,
    ddim_affine,
    ddim_sample,
    generated_distribution,
)
from theory.unlearning import METHOD_NAMES, PRESETS, UnlearningMethod, compose, unlearn

__all__ = [
    "DDIMMap",
    "GeneratedDistribution",
    "METHOD_NAMES",
    "PRESETS",
    "StageReport",
    "UnlearningMethod",
    "clip_score",
    "compose",
    "ddim_affine",
    "ddim_sample",
    "generated_distribution",
    "incidental_presence_matrix",
    "presence",
    "stage_report",
    "GDResult",
    "finetune_gd",
    "DataDistribution",
    "FinetuneSetup",
    "HessianEigen",
    "LinearDiffusionProblem",
    "NoiseSchedule",
    "Trajectory",
    "adam_preconditioner",
    "bayes_optimal_denoiser",
    "check_gd_step_size",
    "concept_distribution",
    "curvature_along_delta",
    "diffusion_grad",
    "diffusion_loss",
    "eigen_coordinates",
    "finetune_setup",
    "forget_loss_recovery",
    "from_eigen_coordinates",
    "gd_amplification",
    "gd_closed_form",
    "hessian_eigen",
    "hessian_matvec",
    "join_params",
    "make_embeddings",
    "make_noise_schedule",
    "make_problem",
    "new_concept_distribution",
    "predict_rho",
    "predict_rho_truncated",
    "predicted_rho_closed_form",
    "predicted_rho_preconditioned",
    "pretrain_by_steps",
    "pretrain_closed_form",
    "principal_angles",
    "problem_from_arrays",
    "rho",
    "second_moments",
    "simulate_finetune",
    "spectral_weights",
    "split_params",
    "target_moments",
    "truncated_closure_inputs",
    "unlearn",
]
