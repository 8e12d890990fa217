"""Sweep config schema: exact round-trips and one test per user-facing error message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments.config import ConfigError, load_config, loads_config
from experiments.sweep import _prepare_folder

CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("theory_*.toml")
)
BASE = """
name = "t"
steps = [0, 10]
[params]
dim = 4
embed_dim = 4
num_concepts = 3
num_levels = 2
"""


def _raises(text: str, message: str, overrides=()):
    with pytest.raises(ConfigError, match=re.escape(message)):
        loads_config(text, overrides=overrides)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_default_configs_round_trip_byte_identical(path, tmp_path):
    config = load_config(path)
    config.save(tmp_path / "a.toml")
    again = load_config(tmp_path / "a.toml")
    again.save(tmp_path / "b.toml")
    assert (tmp_path / "a.toml").read_bytes() == (tmp_path / "b.toml").read_bytes()
    assert again == config
    assert path.read_text() == config.to_toml()  # the shipped files are already canonical


def test_round_trip_normalises_types_and_order(tmp_path):
    text = (
        BASE
        + '[axes]\nlr = [1, 0.5]\ncurvature = {logspace = [-1, 1, 3]}\nmethod = ["uce", "esd_x"]\n'
    )
    config = loads_config(text)
    assert config.params == {"dim": 4, "embed_dim": 4, "num_concepts": 3, "num_levels": 2}
    assert config.axes["lr"] == [1.0, 0.5] and isinstance(config.axes["lr"][0], float)
    assert config.axis_values("curvature") == pytest.approx([0.1, 1.0, 10.0])
    first = config.to_toml()
    assert loads_config(first).to_toml() == first
    assert first.index("[axes]") < first.index("[params]") and first.index(
        "curvature"
    ) < first.index("lr")


def test_unknown_top_level_key_suggests_closest():
    _raises(
        BASE.replace('name = "t"', 'name = "t"\nchunk_sise = 3'),
        "Unknown key `chunk_sise` in the top level of <string>. Did you mean `chunk_size`?",
    )


def test_unknown_param_key_suggests_closest():
    _raises(
        BASE + "curvture = 1.0\n",
        "Unknown key `curvture` in [params] of <string>. Did you mean `curvature`?",
    )


def test_unknown_axis_key_suggests_closest():
    _raises(
        BASE + "[axes]\nlearning_rate = [0.1]\n",
        "Unknown key `learning_rate` in [axes] of <string>.",
    )
    _raises(BASE + "[axes]\novrlap_angle = [0.1]\n", "Did you mean `overlap_angle`?")


def test_wrong_type():
    _raises(
        BASE.replace("dim = 4", 'dim = "4"', 1),
        "`params.dim` must be an integer; got '4' (str) in <string>.",
    )
    _raises(BASE + "[axes]\nlr = [0.1, true]\n", "`axes.lr[1]` must be a number; got True (bool)")


def test_value_out_of_range():
    _raises(BASE + "lr = -1\n", "`params.lr` must be in (0, 100]; got -1.0 in <string>.")
    _raises(
        BASE + "[axes]\noverlap_angle = [0.0, 2.0]\n",
        "`axes.overlap_angle[1]` must be in [0, 1.5707963267948966]; got 2.0",
    )
    _raises(BASE + 'method = "ucee"\n', "`params.method` must be one of 'uce', ")
    _raises(BASE + 'method = "ucee"\n', "Did you mean `uce`?")


def test_empty_axis():
    _raises(BASE + "[axes]\nlr = []\n", "`axes.lr` is empty in <string>; give at least one value.")
    _raises(BASE + "[axes]\nlr = {linspace = [0.1, 1.0, 0]}\n", "`axes.lr` is empty in <string>")


def test_bad_steps_and_duplicates():
    _raises(
        BASE.replace("steps = [0, 10]", "steps = [10, 0]"),
        "`steps` must be ascending without repeats; got [10, 0]",
    )
    _raises(
        BASE.replace("steps = [0, 10]", "steps = []"),
        "`steps` must be a non-empty list of integers; got []",
    )
    _raises(BASE + "[axes]\nlr = [0.1, 0.1]\n", "`axes.lr` repeats a value in <string>")


def test_param_in_both_tables_and_inconsistent_sizes():
    _raises(
        BASE + "lr = 0.1\n[axes]\nlr = [0.2]\n",
        "`lr` is given in both [params] and [axes] of <string>; keep one.",
    )
    _raises(
        BASE.replace("embed_dim = 4", "embed_dim = 3"), "`embed_dim` must be >= `num_concepts` + 1"
    )
    _raises(
        BASE + 'finetune = "other_concepts"\nnum_erased = 3\n',
        "`num_erased` must be <= 2 (num_concepts=3, one concept must remain",
    )


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("does not exist")):
        load_config(tmp_path / "nope.toml")
    _raises("name = ", "<string> is not valid TOML")


def test_overrides_move_between_params_and_axes():
    text = BASE + "[axes]\nlr = [0.1, 0.2]\n"
    fixed = loads_config(text, overrides=["lr=0.3"])
    assert fixed.params["lr"] == 0.3 and "lr" not in fixed.axes
    swept = loads_config(BASE, overrides=["axes.seed={range=[0, 4]}", "steps=[1, 2]"])
    assert swept.axis_values("seed") == [0, 1, 2, 3] and swept.steps == (1, 2)
    _raises(BASE, "Override 'lr0.3' must have the form KEY=VALUE", overrides=["lr0.3"])
    _raises(BASE, "`params.dim` must be an integer; got 'four' (str)", overrides=["dim=four"])


def test_output_folder_of_a_different_config_is_refused_unless_forced(tmp_path):
    first = loads_config(BASE)
    other = loads_config(BASE, overrides=["lr=0.2"])
    _prepare_folder(tmp_path, first, force=False)
    (tmp_path / "chunks" / "g000_c00000.npz").write_bytes(b"old")
    _prepare_folder(tmp_path, first, force=False)  # same config: resume, keep chunks
    assert (tmp_path / "chunks" / "g000_c00000.npz").exists()
    with pytest.raises(
        ConfigError,
        match=re.escape(f"Output folder {str(tmp_path)!r} holds a run of a different config"),
    ):
        _prepare_folder(tmp_path, other, force=False)
    _prepare_folder(tmp_path, other, force=True)
    assert not (tmp_path / "chunks" / "g000_c00000.npz").exists()
    assert (tmp_path / "config.toml").read_text() == other.to_toml()
