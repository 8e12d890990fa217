"""Each theory figure writes PNG+PDF and plots exactly the numbers its sweep stored."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from experiments.config import loads_config
from experiments.figures import (
    fig_closure,
    fig_curves,
    fig_knobs,
    fig_phase,
    fig_presence,
    fig_spectrum,
)
from experiments.sweep import RESULTS_NAME

SIZES = "dim = 4\nembed_dim = 4\nnum_concepts = 3\nnum_levels = 2\n"


def _config(name, steps, axes, params=""):
    return loads_config(
        f'name = "{name}"\nsteps = {steps}\ntruncation_ranks = [1, 2, 4]\n'
        f"[params]\n{SIZES}{params}\n[axes]\n{axes}"
    )


def _stored(tmp_path, result):
    """The sweep results as saved on disk, read independently of the figure code."""
    return xr.load_dataset(
        tmp_path / "runs" / result.dataset.attrs["name"] / RESULTS_NAME, engine="h5netcdf"
    )


def _files(result):
    assert result.png.stat().st_size > 10_000 and result.pdf.stat().st_size > 5_000
    assert result.png.name.startswith("theory_")


def test_phase_figure(tmp_path):
    cfg = _config(
        "theory_phase",
        "[20]",
        "overlap_angle = [0.0, 0.8, 1.5707963267948966]\ncurvature = [0.1, 1.0]\n",
        'finetune = "constructed"\noptimizer = "gd"\nlr = 0.2\n',
    )
    result = fig_phase.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    ds = _stored(tmp_path, result)
    np.testing.assert_array_equal(
        result.data["rho"], ds.rho.isel(steps=-1).transpose("curvature", "overlap_angle")
    )
    np.testing.assert_array_equal(
        result.data["predicted_rho"],
        ds.predicted_rho.isel(steps=-1).transpose("curvature", "overlap_angle"),
    )
    # the constructed prompt sits at exactly the requested principal angle from r
    angles = (
        ds.principal_angles.isel(forget_direction=0).transpose("curvature", "overlap_angle").values
    )
    np.testing.assert_allclose(
        angles, np.broadcast_to(ds.overlap_angle.values, angles.shape), atol=1e-6
    )
    assert np.all(np.abs(result.data["rho"][:, -1]) < 1e-10)  # orthogonal prompt: no resurgence


def test_curves_figure(tmp_path):
    cfg = _config(
        "theory_curves",
        "[0, 5, 20]",
        'method = ["uce", "esd_x"]\noptimizer = ["gd_closed_form", "adam"]\nlr = [0.01, 0.3]\n',
        'finetune = "new_concepts"\ncommon_component = 0.5\n',
    )
    result = fig_curves.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    ds = _stored(tmp_path, result)
    for method in ("uce", "esd_x"):
        np.testing.assert_array_equal(
            result.data[f"gd_closed_form/{method}"],
            ds.rho.sel({"method": method, "optimizer": "gd_closed_form", "lr": 0.3}),
        )
        np.testing.assert_array_equal(
            result.data[f"adam/{method}"],
            ds.rho.sel({"method": method, "optimizer": "adam", "lr": 0.01}),
        )


def test_closure_figure(tmp_path):
    cfg = _config(
        "theory_closure",
        "[5, 20]",
        "seed = {range = [0, 4]}\n",
        'finetune = "other_concepts"\noptimizer = "gd"\n'
        "p_null = 0.1\ntarget_shift = 0.5\nlr = 0.3\n",
    )
    result = fig_closure.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    ds = _stored(tmp_path, result)
    np.testing.assert_array_equal(result.data["rho"], ds.rho.isel(steps=-1))
    np.testing.assert_array_equal(
        result.data["predicted_rho_truncated"],
        ds.predicted_rho_truncated.isel(steps=-1).transpose("rank", "seed"),
    )
    # rho_k with all eigenspaces is the full law, and the full law matches the optax simulation
    assert result.data["median_error"][-1] <= result.data["median_error"][0]
    np.testing.assert_allclose(ds.predicted_rho, ds.rho, atol=1e-8)


def test_presence_figure(tmp_path):
    cfg = _config(
        "theory_presence",
        "[0, 20]",
        'method = ["uce", "esd_x"]\n',
        'finetune = "new_concepts"\ncommon_component = 0.5\nlr = 0.3\n',
    )
    result = fig_presence.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    ds = _stored(tmp_path, result)
    np.testing.assert_array_equal(result.data["bars"][0], ds.presence_before)
    np.testing.assert_array_equal(result.data["bars"][2], ds.presence.isel(steps=-1))
    np.testing.assert_array_equal(
        result.data["incidental"], ds.incidental_presence.sel(stage="finetuned")
    )
    # after-unlearning presence under the concept's own prompt is the same number both ways
    np.testing.assert_allclose(result.data["bars"][1], ds.presence.isel(steps=0), atol=1e-12)
    assert result.data["bars"][1][0] < result.data["bars"][0][0]  # UCE lowers presence


def test_spectrum_figure(tmp_path):
    cfg = _config(
        "theory_spectrum",
        "[50]",
        "common_component = [0.0, 0.6]\n",
        'finetune = "new_concepts"\nlr = 0.3\n',
    )
    result = fig_spectrum.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    ds = _stored(tmp_path, result)
    for rc in (0.0, 0.6):
        np.testing.assert_array_equal(
            result.data[rc]["spectral_weights"],
            ds.spectral_weights.sel(common_component=rc).values.ravel(),
        )
        assert result.data[rc]["spectral_weights"].sum() == pytest.approx(1.0, abs=1e-10)


def test_knobs_figure(tmp_path):
    cfg = _config(
        "theory_knobs",
        "[50]",
        "lr = [0.1, 0.3, 0.5]\nnum_erased = [1, 2]\ncommon_component = [0.0, 0.3, 0.6]\n",
        'finetune = "new_concepts"\n',
    )
    result = fig_knobs.make(tmp_path / "fig", tmp_path / "runs", config=cfg)
    _files(result)
    rho = _stored(tmp_path, result).rho.isel(steps=-1)
    np.testing.assert_array_equal(
        result.data["lr/n=2"], rho.sel(num_erased=2, common_component=0.3)
    )
    np.testing.assert_array_equal(result.data["rho_c/n=1"], rho.sel(num_erased=1, lr=0.3))
    np.testing.assert_array_equal(result.data["n/rho_c=0.6"], rho.sel(common_component=0.6, lr=0.3))
