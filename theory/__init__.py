"""Exact linear conditional diffusion model of concept resurgence (JAX). See theory.md."""

from theory.law import gd_amplification, predict_rho, predict_rho_truncated, truncated_closure_inputs

__all__ = ["gd_amplification", "predict_rho", "predict_rho_truncated", "truncated_closure_inputs"]
