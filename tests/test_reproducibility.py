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
    # two worker processes, as `resurgence figures` on 2 CPUs: the committed summary was made by
    # one process, so this also checks that the figures' numbers do not depend on `jobs`
    results = make_all_figures(out=tmp_path / "fig", runs=tmp_path / "runs", jobs=2, progress=False)
    assert len(results) == len(FIGURE_MODULES)
    regenerated = json.loads((tmp_path / "fig" / SUMMARY_NAME).read_text())
    problems = []
    for name in results:
        problems += compare_summaries(COMMITTED[name], regenerated[name], where=name)
    assert not problems, "headline numbers moved:\n" + "\n".join(problems)
    # A property, not a stored number: presence at the displacement predicted from ALL eigenspaces
    # is the exact presence (same Monte-Carlo key), for every method.
    by_rank = regenerated["theory_readouts"]["median_presence_error_by_rank"]
    assert all(errors["120"] <= 1e-12 for errors in by_rank.values()), by_rank


def test_parallel_figures_run_every_module_once_and_refuse_no_jobs():
    from experiments.figures_main import _BY_COST

    assert sorted(_BY_COST) == sorted(FIGURE_MODULES) and len(set(_BY_COST)) == len(_BY_COST)
    with pytest.raises(ValueError, match=re.escape("`jobs` must be >= 1, got 0.")):
        make_all_figures(jobs=0)
    from theory._backend import init_backend_without_lapack_deadlock

    with pytest.raises(ValueError, match="`cpu` 1000000 is not one this process may use"):
        init_backend_without_lapack_deadlock(cpu=10**6)


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
    # Monte-Carlo presence (and its Spearmans) may move by a few boundary samples, no more
    mc = {"max_presence_regained": {"uce": 0.5}, "spearman_law": {"rho": 0.14}}
    few = {"max_presence_regained": {"uce": 0.5 + 2 / 1024}, "spearman_law": {"rho": 0.141}}
    many = {"max_presence_regained": {"uce": 0.51}, "spearman_law": {"rho": 0.15}}
    assert compare_summaries(mc, few) == []
    assert len(compare_summaries(mc, many)) == 2


def test_readme_python_examples_print_what_they_say():
    """The README's API examples run in order and return the values their comments state."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        for name, stated in re.findall(r"^(\w+(?:\.\w+)?)\s+# \[([^\]]+)\]", block, re.M):
            value = eval(name, namespace)  # noqa: S307 - a name from our own README
            expected = [float(v) for v in stated.split(",")]
            # The comments round to 3 decimals.
            np.testing.assert_allclose(np.asarray(value), expected, atol=5e-4, err_msg=name)
    assert len(blocks) >= 2 and "change" in namespace
    # The output_rho prediction is exact: it equals the readout at the closed-form GD theta_T.
    exact = [float(namespace["ro"].value["output_rho"](t)) for t in namespace["result"].params[1:3]]
    np.testing.assert_allclose(np.asarray(namespace["change"]), exact, rtol=1e-10)


def test_no_jax_thread_stays_pinned_to_the_cpu_its_client_was_created_on():
    """The client is created with the affinity narrowed to one CPU (a one-thread pool); its
    threads must get the process's CPUs back, or every XLA thread shares one core."""
    import os

    import jax

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(cpus) < 2 or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux and at least two usable CPUs")
    jax.devices()  # conftest started the backend through init_backend_without_lapack_deadlock
    pinned = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            allowed = os.sched_getaffinity(int(tid))
        except OSError:  # the thread has exited
            continue
        if allowed != cpus:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                pinned[comm.read().strip()] = sorted(allowed)
    assert not pinned, f"threads restricted to fewer CPUs than the process's {sorted(cpus)}: {pinned}"
