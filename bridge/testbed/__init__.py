"""The tiny CPU testbed: a synthetic concept world where the whole resurgence experiment runs.

``world`` (coloured circles with captions), ``classifier`` (the presence detector), ``train``
(pretraining the tiny diffusers UNet), ``predict`` (curvature -> predicted rho over learning
rates), ``stages`` / ``demo`` (the cached pipeline), ``results`` and ``figures``.
Heavy imports stay inside the submodules; ``from bridge.testbed.demo import run_demo``.
"""
