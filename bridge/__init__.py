"""Measurements of the theory's observables on real diffusers UNets (PyTorch).

JAX is only used here to call the theory's resurgence law on small arrays, so it must never take
the accelerator a PyTorch UNet runs on: the platform is decided once, here, before anything in the
package imports jax. Heavy modules (torch, diffusers) are not imported at package import.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

__all__ = [
    "tiny",
    "sd",
    "loading",
    "groups",
    "loss",
    "curvature",
    "spectra",
    "parallel",
    "subspaces",
    "probes",
    "sampler",
    "readouts",
    "hygiene",
    "ggn",
    "local_curvature",
    "predict",
    "measure",
]
