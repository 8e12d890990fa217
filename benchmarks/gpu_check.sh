#!/usr/bin/env bash
# The GPU check of issue 12 (item 5), as one command that prints one JSON line on stdout
# (progress on stderr). A UNet of SD v1.4's size with random weights, bf16 and fp32: gradient and
# HVP times, top-20 Lanczos of cross-attention K/V at both ends, one UCE edit, one fine-tuning
# step (batch 4, 64x64, autocast, gradient checkpointing), peak memory. See benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh              # CUDA, SD v1.4 size; finishes in under 8 minutes
#   benchmarks/gpu_check.sh --tiny       # tiny UNet on CPU: the smoke test of this script
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1
export JAX_PLATFORMS=cpu  # nothing here uses JAX; never let it take the GPU
# The Python side keeps to a 420 s budget and always prints its line; this is the hard stop.
exec timeout --signal=TERM --kill-after=10 470 "$PYTHON" -m benchmarks.gpu_check "$@"
