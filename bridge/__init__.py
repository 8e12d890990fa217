"""Measurements of the theory's observables on real diffusers UNets (PyTorch)."""
