"""The law's predictions on the real-image testbed: per-bin records, pooled summary, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

from bridge.realworld.experiment import ExperimentConfig
from bridge.realworld.predict import PredictSettings, plot_predictions, predict_realworld
from experiments.cli_bridge_realworld import realworld_app
from tests.bridge_realworld._noto import requires_noto

RUN = dict(tasks=("pistol",), methods=("uce",), n_bins=2, binning="quantile", seeds_per_prompt=1,
           max_per_bin=1, eval_seeds=2, eval_prompts=2, sample_steps=2)  # fmt: skip
SETTINGS = dict(gd_steps=4, top_k=2, probe_batch=4, presence_seeds=2, forget_images=2)


@pytest.fixture(scope="module")
def model(trained):
    from bridge.realworld.bundle import load_model

    return load_model(trained[0])


@requires_noto
def test_predictions_per_bin_pool_into_the_summary_and_a_rerun_skips_them(
    model, tmp_path, monkeypatch
):
    cfg = ExperimentConfig(**RUN)
    summary = predict_realworld(model, cfg, tmp_path, task="pistol",
                                settings=PredictSettings(**SETTINGS), progress=False)  # fmt: skip
    folder = tmp_path / "predict" / "pistol" / "uce_lam_0_1"
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("bin*.json")}
    assert len(records) == 2 and set(summary["bins"]) == set(records)
    pred, meas = [], []
    for rec in records.values():
        assert rec["steps"] == [0, 1, 2, 3, 4] and len(rec["lrs"]) == 3
        p, m = np.asarray(rec["predicted"]["presence"]), np.asarray(rec["measured"]["presence"])
        # T = 0 is theta_u for both: the same images on the same seeds, the same presence
        np.testing.assert_allclose(p[:, 0], rec["values_unlearned"]["presence"], atol=1e-6)
        np.testing.assert_allclose(m[:, 0], rec["values_unlearned"]["presence"], atol=1e-6)
        pred += p[:, 1:].ravel().tolist()
        meas += m[:, 1:].ravel().tolist()
    pred, meas = np.asarray(pred), np.asarray(meas)
    assert summary["presence"]["points"] == 24
    assert summary["presence"]["median_abs_error"] == pytest.approx(np.median(np.abs(pred - meas)))
    expected = spearmanr(pred, meas).statistic
    got = summary["presence"]["spearman"]
    assert (got is None and np.isnan(expected)) or got == pytest.approx(expected)

    png = plot_predictions([folder], tmp_path / "predictions.png")
    assert png.stat().st_size > 10_000  # drawn from the same records (looked at: docs/realworld.md)

    def no_work(*args, **kwargs):
        raise AssertionError("a finished bin was recomputed")

    monkeypatch.setattr("bridge.testbed.predict.predict_and_measure", no_work)
    again = predict_realworld(model, cfg, tmp_path, task="pistol",
                              settings=PredictSettings(**SETTINGS), progress=False)  # fmt: skip
    assert again["presence"] == summary["presence"]


def test_bad_settings_and_tasks_are_refused(model, tmp_path):
    for bad, message in (
        (dict(gd_steps=0), "`gd_steps` must be >= 1"),
        (dict(lr_fractions=(0.5, 1.2)), "`lr_fractions` must lie in (0, 1)"),
        (dict(curvature="fisher"), "`curvature` must be 'ggn' or 'hessian'"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            PredictSettings(**bad)
    cfg = ExperimentConfig(**RUN)
    with pytest.raises(ValueError, match="is not in the config's tasks"):
        predict_realworld(model, cfg, tmp_path, task="ship", progress=False)
    with pytest.raises(ValueError, match="is not in the config's methods"):
        predict_realworld(model, cfg, tmp_path, task="pistol", method="esd-x", progress=False)
    res = CliRunner().invoke(
        realworld_app,
        ["predict", "--task", "pistol", "--lr-fractions", "0.5,2", "--out", str(tmp_path / "x")],
    )
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "`lr_fractions` must lie in (0, 1)" in res.stderr
