"""The headline numbers of the README, docs and figure titles regenerate on this machine.

`resurgence figures` writes every number its titles state to the committed figures/summary.json;
this test reruns the default theory sweeps from scratch and compares. A change of machine, BLAS
build, thread count or dependency that moves a headline number fails here instead of silently
changing the README.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from experiments.figures_main import (
    FIGURE_MODULES,
    SUMMARY_NAME,
    compare_summaries,
    make_all_figures,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = json.loads((ROOT / "figures" / SUMMARY_NAME).read_text())


@pytest.mark.slow
def test_theory_headline_numbers_regenerate(tmp_path):
    results = make_all_figures(out=tmp_path / "fig", runs=tmp_path / "runs", progress=False)
    assert len(results) == len(FIGURE_MODULES)
    regenerated = json.loads((tmp_path / "fig" / SUMMARY_NAME).read_text())
    problems = []
    for name in results:
        problems += compare_summaries(COMMITTED[name], regenerated[name], where=name)
    assert not problems, "headline numbers moved:\n" + "\n".join(problems)


def test_compare_summaries_reports_each_difference():
    a = {"x": {"rho": 0.25, "count": 4, "best": "uce"}, "y": 1.0}
    b = {"x": {"rho": 0.25 + 2e-6, "count": 5, "best": "uce"}, "z": 1.0}
    problems = compare_summaries(a, b, where="fig")
    assert problems == [
        "fig/x/count: committed 4, regenerated 5",
        "fig/x/rho: committed 0.25, regenerated 0.250002",
        "fig/y: present in only one summary",
        "fig/z: present in only one summary",
    ]
    assert compare_summaries(a, json.loads(json.dumps(a))) == []


def test_readme_python_example_prints_what_it_says():
    """The README's API example runs and returns the values its comment states."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    stated = re.search(r"result\.rho\s+# \[([^\]]+)\]", block).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    expected = [float(v) for v in stated.split(",")]
    np.testing.assert_allclose(np.asarray(namespace["result"].rho), expected, atol=5e-4)
