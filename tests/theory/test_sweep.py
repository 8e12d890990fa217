"""Sweeps: values against independent per-configuration closed forms, resume, devices, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import xarray as xr
from typer.testing import CliRunner

import experiments.sweep as sweep_module
import theory
from experiments.cli import app
from experiments.config import loads_config
from experiments.sweep import RESULTS_NAME, run_sweep
from theory.testing import assert_allclose_report
from theory.unlearning import unlearn

REPO = Path(__file__).resolve().parents[2]
SIZES = {"dim": 4, "embed_dim": 4, "num_concepts": 3, "num_levels": 2}
TINY = """
name = "tiny"
chunk_size = 5
steps = [0, 5, 30]
truncation_ranks = [1, 2]

[params]
dim = 4
embed_dim = 4
num_concepts = 3
num_levels = 2
finetune = "other_concepts"

[axes]
seed = [0, 1]
common_component = [0.0, 0.5]
lr = [0.1, 0.4]
optimizer = ["gd_closed_form", "gd"]
method = ["uce", "esd_x"]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = loads_config(TINY)
    out = tmp_path_factory.mktemp("sweep") / "run"
    return config, out, run_sweep(config, out, progress=False)


def _independent(method, seed, rho_c, lr, steps):
    """rho(T) for one configuration, built from the public theory API without the sweep kernel."""
    problem = theory.make_problem(jax.random.PRNGKey(seed), common_component=rho_c, **SIZES)
    theta_0 = theory.bayes_optimal_denoiser(problem)
    theta_u = unlearn(problem, theta_0, method, 0)
    data = theory.concept_distribution(problem, [0.0, 0.5, 0.5])
    setup = theory.finetune_setup(problem, data, theta_u, theta_0)
    closed = theory.rho(
        theory.gd_closed_form(setup, theta_u, lr, jnp.asarray(steps)), theta_u, theta_0
    )
    law = theory.predicted_rho_closed_form(setup, lr, jnp.asarray(steps))
    traj = theory.simulate_finetune(problem, data, theta_u, theta_0, optax.sgd(lr), max(steps))
    return np.asarray(closed), np.asarray(law), np.asarray(traj.rho)[list(steps)]


@pytest.mark.parametrize(
    "method, seed, rho_c, lr",
    [("uce", 0, 0.0, 0.1), ("esd_x", 1, 0.5, 0.4), ("esd_x", 0, 0.0, 0.4)],
)
def test_sweep_values_equal_independent_closed_forms(tiny, method, seed, rho_c, lr):
    config, _, ds = tiny
    closed, law, simulated = _independent(method, seed, rho_c, lr, config.steps)
    point = {"method": method, "seed": seed, "common_component": rho_c, "lr": lr}
    # float64 round-off through eigh and a few hundred flops: 1e-10 absolute is ample.
    assert_allclose_report(
        ds.rho.sel({"optimizer": "gd_closed_form", **point}),
        closed,
        rtol=0,
        atol=1e-10,
        name="rho GD closed form",
    )
    assert_allclose_report(
        ds.predicted_rho.sel({"optimizer": "gd_closed_form", **point}),
        law,
        rtol=0,
        atol=1e-10,
        name="predicted_rho",
    )
    # 30 optax steps vs the closed form: round-off accumulates over the steps, still << 1e-8.
    assert_allclose_report(
        ds.rho.sel({"optimizer": "gd", **point}), simulated, rtol=0, atol=1e-8, name="rho optax GD"
    )
    assert np.ptp(ds.rho.sel(optimizer="gd_closed_form").values) > 0.02  # the grid really varies


def test_sweep_observables_have_their_meaning(tiny):
    _, _, ds = tiny
    weights = ds.spectral_weights.sum(("level", "eigen"))
    assert_allclose_report(
        weights, np.ones(weights.shape), rtol=0, atol=1e-10, name="spectral weights sum"
    )
    assert_allclose_report(
        ds.rho.sel(steps=0), np.zeros(ds.rho.sel(steps=0).shape), rtol=0, atol=1e-12, name="rho(0)"
    )
    # the full truncation (all eigenspaces) is the law itself
    assert set(ds.rho.dims) == {"seed", "common_component", "lr", "optimizer", "method", "steps"}
    assert np.all((ds.principal_angles >= 0) & (ds.principal_angles <= np.pi / 2 + 1e-12))


def test_manifest_records_the_run(tiny):
    config, out, _ = tiny
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] == config.hash()
    assert manifest["seeds"] == [0, 1]
    assert manifest["packages"]["jax"] == jax.__version__
    # 4 variants (2 methods x 2 optimizers) x 4 problems (2 seeds x 2 rho_c) x 2 lrs: chunks of
    # 5 // 2 = 2 problems with both lrs, so 2 chunks per variant. Compiled: the problem + theta_0
    # stage once, the unlearning once per method, the fine-tuning setup once (shared by both
    # methods) and one observation stage per optimizer.
    assert manifest["chunks_total"] == 8 and manifest["wall_time_s"] > 0
    assert manifest["variants"] == 4 and manifest["chunk_size"] == 4
    assert manifest["compiled_functions"] == 1 + 2 + 1 + 2
    assert set(manifest) >= {"git", "config", "python", "created_utc"}


def test_resume_after_deleting_chunks_is_identical(tiny, tmp_path):
    config, out, ds = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("g000_v000_c00000.npz", "g000_v003_c00001.npz", RESULTS_NAME):
        (copy / "chunks" / name if name.endswith(".npz") else copy / name).unlink()
    again = run_sweep(config, copy, progress=False)
    xr.testing.assert_identical(again, ds)


def test_interrupted_run_resumes_to_identical_results(tiny, tmp_path, monkeypatch):
    config, _, ds = tiny
    original = sweep_module._save_chunk
    calls = []

    def interrupt_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        original(*args)

    monkeypatch.setattr(sweep_module, "_save_chunk", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, tmp_path, progress=False)
    assert len(list((tmp_path / "chunks").glob("*.npz"))) == 2
    monkeypatch.setattr(sweep_module, "_save_chunk", original)
    again = run_sweep(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["chunks_resumed"] == 2
    xr.testing.assert_identical(again, ds)


def test_two_devices_give_the_results_of_one(tiny, tmp_path):
    config, _, ds = tiny
    (tmp_path / "tiny.toml").write_text(config.to_toml())
    script = textwrap.dedent(f"""
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        from experiments.config import load_config
        from experiments.sweep import run_sweep
        assert len(jax.devices()) == 2, jax.devices()
        config = load_config({str(tmp_path / "tiny.toml")!r})
        two = run_sweep(config, {str(tmp_path / "two")!r}, progress=False)
        one = run_sweep(
            config, {str(tmp_path / "one")!r}, progress=False, devices=jax.devices()[:1]
        )
        for name in two.data_vars:  # last-bit differences only (measured max 1.1e-16): see below
            np.testing.assert_allclose(
                two[name].values, one[name].values, rtol=1e-13, atol=1e-15, err_msg=name
            )
        manifest = open({str(tmp_path / "two" / "manifest.json")!r}).read()
        print("chunk", __import__("json").loads(manifest)["chunk_size"])
    """)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chunk 8" in done.stdout  # 2 problems x 2 lrs per device
    two = xr.load_dataset(tmp_path / "two" / RESULTS_NAME, engine="h5netcdf")
    # The SPMD-partitioned program may fuse a reduction differently from the one-device program,
    # so a few values differ in the last bit; rtol 1e-13 is ~500 ulp, far below any physics.
    for name in ds.data_vars:  # and the same numbers as this process's single-device run
        np.testing.assert_allclose(
            two[name].values, ds[name].values, rtol=1e-13, atol=1e-15, err_msg=name
        )


def test_cli_sweep_resumes_and_reports_bad_input(tiny, tmp_path):
    config, out, _ = tiny
    runner = CliRunner()
    (tmp_path / "tiny.toml").write_text(config.to_toml())
    result = runner.invoke(
        app, ["theory", "sweep", str(tmp_path / "tiny.toml"), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "results.nc" in result.output
    result = runner.invoke(
        app,
        [
            "theory",
            "sweep",
            str(tmp_path / "tiny.toml"),
            "--out",
            str(out),
            "--set",
            "lr=0.2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    assert "holds a run of a different config" in result.output
    (tmp_path / "bad.toml").write_text(config.to_toml().replace("chunk_size", "chunk_sise"))
    result = runner.invoke(
        app, ["theory", "sweep", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "Did you mean `chunk_size`?" in result.output


def _eigh_operand_shapes(jaxpr):
    """Operand shapes of every eigh in a (closed) jaxpr, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "eigh":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if hasattr(sub, "jaxpr"):
                    shapes += _eigh_operand_shapes(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))
                elif hasattr(sub, "eqns"):
                    shapes += _eigh_operand_shapes(sub)
    return shapes


@pytest.mark.parametrize("optimizer", ["gd_closed_form", "gd"])
def test_grid_decomposes_each_problem_once_not_once_per_lr(optimizer):
    """Every eigendecomposition of run_grid is batched over problems only: P, never P x R."""
    from theory.sweep import DYNAMIC_KNOBS, PROBLEM_KNOBS, ScenarioStatic, run_grid

    static = ScenarioStatic(**SIZES, optimizer=optimizer, finetune="other_concepts", steps=(0, 3))
    n_problems, n_lrs = 3, 7
    knobs = {
        k: jnp.full(n_problems, DYNAMIC_KNOBS[k], jnp.int64 if k == "seed" else jnp.float64)
        for k in PROBLEM_KNOBS
    }
    closed = jax.make_jaxpr(lambda k, lr: run_grid(static, k, lr))(knobs, jnp.ones(n_lrs) * 0.1)
    shapes = _eigh_operand_shapes(closed.jaxpr)
    hessian = (n_problems, SIZES["num_levels"], SIZES["dim"] + SIZES["embed_dim"])
    assert any(s[:3] == hessian for s in shapes), shapes  # the Hessian blocks, once per problem
    assert all(n_lrs not in s for s in shapes), shapes  # no eigh repeated per learning rate


def test_sweep_refuses_an_unbounded_closed_form_method_before_running(monkeypatch):
    """Only a gradient-ascent target can make the closed form unbounded: the sweep's one-program
    check raises the solver's own error for it, and passes once proximity bounds it (the eager
    solve agrees on both)."""
    import dataclasses

    from theory.sweep import DYNAMIC_KNOBS, ScenarioStatic, check_unlearning, scenario_problem
    from theory.unlearning import compose, presets

    def ascent(proximity=1e-3):
        return compose("gradient_ascent", "all", "closed_form", proximity=proximity)

    monkeypatch.setitem(presets.PRESETS, "ascent_closed_form", ascent)
    monkeypatch.setitem(presets.PRESETS, "ascent_bounded", lambda: ascent(proximity=10.0))
    knobs = {k: jnp.asarray(v) for k, v in DYNAMIC_KNOBS.items()}
    unbounded = ScenarioStatic(
        dim=6, embed_dim=4, num_concepts=3, num_levels=3, method="ascent_closed_form"
    )
    message = "the masked unlearning objective is unbounded below"
    with pytest.raises(ValueError, match=message):
        check_unlearning(unbounded, knobs)
    problem = scenario_problem(unbounded, knobs)
    theta_0 = theory.bayes_optimal_denoiser(problem)
    with pytest.raises(ValueError, match=message):
        unlearn(problem, theta_0, ascent(), 0)
    bounded = dataclasses.replace(unbounded, method="ascent_bounded")
    check_unlearning(bounded, knobs)  # no error
    unlearn(problem, theta_0, ascent(proximity=10.0), 0)
