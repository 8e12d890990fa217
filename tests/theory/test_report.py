"""Stage report (theory.report): presence across stages, against direct computations."""

import json
import re

import jax
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theory import (
    concept_distribution,
    diffusion_grad,
    make_problem,
    new_concept_distribution,
    pretrain_closed_form,
    second_moments,
    simulate_finetune,
)
from theory.presence import incidental_presence_matrix
from theory.report import stage_report
from theory.testing import assert_allclose_report
from theory.unlearning import optax_solver, unlearn

K = 4
STEPS = (0, 10, 300)
# One stage count and sample count for every report here, so the presence kernel compiles once.
NS = 2048


@pytest.fixture(scope="module")
def setup():
    problem = make_problem(jax.random.PRNGKey(0), dim=8, embed_dim=6, num_concepts=K, num_levels=4)
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(K, 1.0 / K)))
    return problem, theta_0


FT_PROBS = np.array([0.0, 0.0, 0.5, 0.5])


@pytest.fixture(scope="module")
def gd_report(setup):
    problem, theta_0 = setup
    return stage_report(
        problem, theta_0, "uce", 0, FT_PROBS, steps=STEPS, retain=(1,), num_samples=NS
    )


def test_gd_report_against_direct_gd_loop(setup, gd_report):
    problem, theta_0 = setup
    rep = gd_report
    theta_u = unlearn(problem, theta_0, "uce", 0, retain=(1,))
    moments = second_moments(problem, concept_distribution(problem, FT_PROBS))

    def step(theta, _):
        return theta - rep.lr * diffusion_grad(theta, moments, problem.schedule), None

    delta = theta_u - theta_0
    for i, t in enumerate(STEPS):
        theta_t, _ = jax.lax.scan(step, theta_u, None, length=t)
        expected = np.asarray(
            incidental_presence_matrix(problem, theta_t, range(K), num_samples=NS)
        )
        assert_allclose_report(
            rep.incidental_presence[2 + i], expected[[0]], rtol=0, atol=1e-12, name="presence"
        )
        rho_direct = -float(np.sum((theta_t - theta_u) * delta) / np.sum(delta**2))
        # GD loop vs eigenbasis closed form: float64 round-off accumulated over <= 300 steps.
        assert rep.rho[i] == pytest.approx(rho_direct, abs=1e-10)
        assert rep.predicted_rho[i] == pytest.approx(rho_direct, abs=1e-10)
    before = np.asarray(incidental_presence_matrix(problem, theta_0, range(K), num_samples=NS))
    assert_allclose_report(
        rep.self_presence[0], np.diag(before), rtol=0, atol=1e-12, name="pretrained"
    )
    assert rep.presence[0, 0] > 0.9 and rep.presence[1, 0] < 0.3
    assert rep.forget_loss_recovery[0] == 0.0


def test_adam_report_matches_simulation(setup):
    problem, theta_0 = setup
    rep = stage_report(
        problem,
        theta_0,
        "mace",
        0,
        FT_PROBS,
        steps=(0, 20, 40),
        optimizer="adam",
        lr=1e-2,
        retain=(1,),
        num_samples=NS,
    )
    theta_u = unlearn(problem, theta_0, "mace", 0, retain=(1,))
    traj = simulate_finetune(
        problem,
        concept_distribution(problem, FT_PROBS),
        theta_u,
        theta_0,
        optax.adam(1e-2),
        40,
        record_every=20,
    )
    assert_allclose_report(rep.rho, traj.rho, rtol=1e-10, atol=1e-12, name="rho")
    assert_allclose_report(
        rep.finetune_loss, traj.finetune_loss, rtol=1e-10, atol=1e-12, name="loss"
    )


def test_to_xarray_and_netcdf_round_trip(gd_report, tmp_path):
    ds = gd_report.to_xarray()
    assert ds["incidental_presence"].dims == ("stage", "forget", "concept")
    assert list(ds["stage"].values) == [
        "pretrained",
        "unlearned",
        "finetuned@0",
        "finetuned@10",
        "finetuned@300",
    ]
    assert list(ds["stage_steps"].values) == [-1, 0, 0, 10, 300]
    path = tmp_path / "report.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    import xarray as xr

    back = xr.load_dataset(path, engine="h5netcdf")
    np.testing.assert_array_equal(back["presence"].values, gd_report.presence)
    assert back.attrs["method"] == "uce"


def test_non_benign_finetuning_warns(setup):
    problem, theta_0 = setup
    with pytest.warns(
        UserWarning, match=re.escape("erased concept(s) [0]: this is not benign fine-tuning")
    ):
        stage_report(problem, theta_0, "uce", 0, [0.5, 0.0, 0.5, 0.0], steps=STEPS, num_samples=NS)
    data = new_concept_distribution(
        problem, problem.embeddings[:, :2], problem.concept_means[:, :2], [0.5, 0.5]
    )
    with pytest.warns(UserWarning, match=re.escape("contains the erased concept 0 (prompts [0])")):
        stage_report(problem, theta_0, "uce", 0, data, steps=STEPS, num_samples=NS)


def test_report_bad_input(setup):
    problem, theta_0 = setup
    with pytest.raises(ValueError, match=re.escape("`optimizer` must be one of ('gd', 'adam')")):
        stage_report(problem, theta_0, "uce", 0, FT_PROBS, optimizer="sgd")
    with pytest.raises(
        ValueError, match=re.escape("`finetune_params` must be one of ('all', 'v_only')")
    ):
        stage_report(problem, theta_0, "uce", 0, FT_PROBS, finetune_params="w_only")
    with pytest.raises(
        ValueError, match=re.escape("`steps` must be a non-empty 1-D sequence of integers >= 0")
    ):
        stage_report(problem, theta_0, "uce", 0, FT_PROBS, steps=(-1, 3))


@pytest.fixture(scope="module")
def orthogonal_setup():
    # rho_c = 0: orthonormal concept embeddings, so every other prompt is orthogonal to c_f.
    problem = make_problem(
        jax.random.PRNGKey(1),
        dim=8,
        embed_dim=6,
        num_concepts=K,
        num_levels=4,
        common_component=0.0,
    )
    theta_0 = pretrain_closed_form(problem, concept_distribution(problem, np.full(K, 1.0 / K)))
    return problem, theta_0


V_ONLY_METHODS = {
    "uce": {},
    "mace": {},
    # ESD-x with plain GD: Adam's per-coordinate scaling would leave the c_f direction.
    "esd_x": {"solver": optax_solver(optax.sgd(0.5), 100)},
}


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(sorted(V_ONLY_METHODS)),
    forget=st.integers(0, K - 1),
    ft_weights=st.lists(st.floats(0.1, 1.0), min_size=K, max_size=K),
    lr=st.floats(0.1, 3.0),
)
def test_orthogonal_finetuning_cannot_revive(orthogonal_setup, method, forget, ft_weights, lr):
    """V-only edit + V-only GD on prompts orthogonal to the erased direction r = M^-1 c_f (here
    r is parallel to c_f): the fine-tuning gradient has no component along delta, nothing moves."""
    problem, theta_0 = orthogonal_setup
    probs = np.asarray(ft_weights)
    probs[forget] = 0.0
    probs /= probs.sum()
    # V-block curvature 2 w_t sum_j p_j c_j c_j^T <= 2 * 0.25 * 1 for unit embeddings: any lr < 4
    # is a stable GD step, so the sampled range is.
    rep = stage_report(
        problem,
        theta_0,
        method,
        forget,
        probs,
        steps=(0, 10, 1000),
        finetune_params="v_only",
        lr=lr,
        method_options=V_ONLY_METHODS[method],
        num_samples=NS,
    )
    assert rep.presence[1, 0] < rep.presence[0, 0] - 0.2
    # Same key and parameters equal to round-off: identical Monte-Carlo samples and decisions.
    np.testing.assert_allclose(rep.presence[-1], rep.presence[1], atol=1e-12)
    assert abs(rep.rho[-1]) < 1e-10


def test_cli_writes_report_and_summary(tmp_path):
    import typer
    from typer.testing import CliRunner

    from experiments.cli_theory_unlearn import unlearn_command

    app = typer.Typer()
    app.command("unlearn")(unlearn_command)
    app.command("other")(lambda: None)  # a second command keeps typer in sub-command mode
    args = [
        "unlearn",
        "--method",
        "mace",
        "--forget",
        "0",
        "--finetune",
        "2,3",
        "--steps",
        "0,10,300",
        "--dim",
        "8",
        "--embed-dim",
        "6",
        "--num-concepts",
        "4",
        "--num-levels",
        "4",
        "--num-samples",
        str(NS),
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    import xarray as xr

    ds = xr.load_dataset(tmp_path / "report.nc", engine="h5netcdf")
    assert summary["retain"] == [1]
    assert summary["presence"]["unlearned"] == ds["presence"].sel(stage="unlearned").values.tolist()
    bad = CliRunner().invoke(app, ["unlearn", "--method", "nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "valid methods" in bad.output
