"""The resurgence experiment on a tiny trained bundle: numbers, resume, claims, bad input."""

from __future__ import annotations

import math
import re

import pytest
from typer.testing import CliRunner

from bridge.realworld.claims import claims, recoveries
from bridge.realworld.experiment import ExperimentConfig, run_experiment
from bridge.realworld.table import ResultsTable
from experiments.cli_bridge_realworld import realworld_app
from tests.bridge_realworld._noto import requires_noto

SMALL_RUN = dict(
    tasks=("pistol",),
    methods=("uce",),
    recipes=("lora",),
    finetune_steps=2,
    checkpoint_every=1,
    batch_size=2,
    n_bins=2,
    binning="quantile",
    seeds_per_prompt=1,
    eval_seeds=2,
    eval_prompts=2,
    sample_steps=2,
)


@pytest.fixture(scope="module")
def model(trained):
    from bridge.realworld.bundle import load_model

    return load_model(trained[0])


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    run_experiment(model, ExperimentConfig(**SMALL_RUN), out, progress=False)
    return out, ResultsTable.read_csv(out / "results.csv")


def _value(table, **where):
    hits = [r for r in table.rows if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, where
    return float(hits[0]["value"])


@requires_noto
def test_base_presence_is_the_classifier_mean_on_the_protocols_seeds(model, finished):
    from bridge.generate import ddim_sample
    from bridge.realworld.protocol import Protocol, default_tasks

    _, table = finished
    task = default_tasks(model.world.concepts)["pistol"]
    prompts = list(task.erased[:2])
    seeds = Protocol().eval_seeds(2)
    emb = model.text.encode_prompts(prompts + [""]).detach()
    images = ddim_sample(
        model.unet,
        emb[:-1].repeat_interleave(2, 0),
        emb[-1:],
        scheduler=model.scheduler,
        seeds=[s for _ in prompts for s in seeds],
        steps=2,
    )
    probs = model.presence.probabilities(images).detach()
    k = model.world.concepts.index("pistol")
    got = _value(table, type="base", prompts="erased", metric="presence")
    assert got == pytest.approx(float(probs[:, k].mean()), abs=1e-6)
    top1 = _value(table, type="base", prompts="erased", metric="top1")
    assert top1 == pytest.approx(float((probs.argmax(-1) == k).float().mean()))


@requires_noto
def test_the_table_has_every_checkpoint_and_rho_starts_at_zero(finished):
    _, table = finished
    fine = [r for r in table.rows if r["finetune_algo"] == "lora"]
    assert {r["finetune_set"] for r in fine} == {"bin0", "bin1"}
    assert {r["type"] for r in fine} == {"step=0", "step=1", "step=2"}
    for b in ("bin0", "bin1"):
        rho0 = _value(table, finetune_set=b, type="step=0", metric="rho")
        assert rho0 == 0.0  # the tracker starts at theta_u exactly
        # step 0 of fine-tuning IS the unlearned model: same seeds, same presence
        assert _value(table, finetune_set=b, type="step=0", prompts="erased", metric="presence") == (
            pytest.approx(
                _value(table, type="unlearned", prompts="erased", metric="presence"), abs=1e-6
            )
        )


@requires_noto
def test_an_interrupted_experiment_resumes_to_the_same_table(model, finished, tmp_path, monkeypatch):
    import bridge.realworld.experiment as exp

    real, calls = exp._finetune, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a user's Ctrl-C in the middle of the second unit
        return real(*args, **kwargs)

    monkeypatch.setattr(exp, "_finetune", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(model, ExperimentConfig(**SMALL_RUN), tmp_path, progress=False)
    monkeypatch.setattr(exp, "_finetune", real)
    partial = ResultsTable.read_csv(tmp_path / "results.csv")
    assert 0 < len(partial) < len(finished[1])
    run_experiment(model, ExperimentConfig(**SMALL_RUN), tmp_path, progress=False)
    assert ResultsTable.read_csv(tmp_path / "results.csv").rows == finished[1].rows


def test_a_folder_is_resumed_only_with_its_own_settings(model, finished, tmp_path):
    out, table = finished
    # threads (and which tasks / methods / recipes run) may change: every unit is done already
    run_experiment(model, ExperimentConfig(**{**SMALL_RUN, "threads": 2}), out, progress=False)
    assert ResultsTable.read_csv(out / "results.csv").rows == table.rows
    changed = ExperimentConfig(**{**SMALL_RUN, "finetune_steps": 4, "uce_from_token": "last"})
    with pytest.raises(ValueError, match=re.escape(
        "holds units run with other settings (finetune_steps: 2 -> 4; uce_from_token: 'first' -> "
        "'last'); give another `--out`"
    )):  # fmt: skip
        run_experiment(model, changed, out, progress=False)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "progress.json").write_text('{"done": []}')
    with pytest.raises(ValueError, match="holds finished units but no config.json"):
        run_experiment(model, ExperimentConfig(**SMALL_RUN), legacy, progress=False)


def _table(final_by_bin, *, unlearned=0.1, synonyms_shift=0.0, others=0.0, lam_effect=None):
    rows = []

    def add(**kw):
        rows.append(dict(seed=1337, **kw))

    for task in ("ship", "Statue of Liberty"):
        add(algo="base", task=task, config="none", finetune_algo="none", finetune_set="none",
            prompts="erased", type="base", metric="presence", value=0.95)
        lams = (0.1, 1.0) if lam_effect else (0.1,)
        for lam in lams:
            config = f"lam={lam:g}"
            bump = lam_effect[task] if lam_effect and lam == 1.0 else 0.0
            for group, shift in (("erased", 0.0), ("synonyms", synonyms_shift), ("others", None)):
                head = dict(algo="uce", task=task, config=config, prompts=group, metric="presence")
                add(**head, finetune_algo="none", finetune_set="none", type="unlearned",
                    value=unlearned)
                for algo in ("lora", "full"):
                    for b, final in enumerate(final_by_bin):
                        value = unlearned + others if shift is None else final + shift + bump
                        add(**head, finetune_algo=algo, finetune_set=f"bin{b}", type="step=0",
                            value=unlearned)
                        add(**head, finetune_algo=algo, finetune_set=f"bin{b}", type="step=10",
                            value=value)
    return ResultsTable(rows)


def test_claims_read_the_numbers_of_the_table():
    table = _table([0.2, 0.3, 0.4, 0.5], others=0.03, lam_effect={"Statue of Liberty": 0.2,
                                                                  "ship": 0.0})
    rec = recoveries(table)
    assert rec[("ship", "uce", "lam=0.1", "lora", "bin3")] == pytest.approx((0.1, 0.5, 0.4))
    found = {c["claim"][:3]: c for c in claims(table)}
    assert found["(a)"]["verdict"] == "reproduced"
    # mean over bins 0.1..0.4 = 0.25 for lam 0.1, 0.25 + 0.2 for the identity's lam 1 runs
    assert found["(a)"]["numbers"]["mean_recovery"] == pytest.approx((0.25 * 3 + 0.45) / 4)
    assert found["(b)"]["numbers"]["mean_spearman_bin_vs_recovery"] == pytest.approx(1.0)
    assert found["(c)"]["verdict"] == "reproduced"
    assert found["(d)"]["verdict"] == "reproduced"
    assert found["(d)"]["numbers"]["identity"] == pytest.approx(0.2)
    assert found["(e)"]["numbers"]["mean_incidental_recovery"] == pytest.approx(0.03)
    assert found["(f)"]["verdict"] == "reproduced"


def test_claims_refute_what_the_table_contradicts():
    table = _table([0.5, 0.4, 0.3, 0.2], unlearned=0.5, synonyms_shift=-0.3)
    found = {c["claim"][:3]: c for c in claims(table)}
    assert found["(a)"]["verdict"] == "refuted"  # presence FELL during fine-tuning
    assert found["(b)"]["numbers"]["mean_spearman_bin_vs_recovery"] == pytest.approx(-1.0)
    assert found["(b)"]["verdict"] == "refuted"
    assert found["(d)"]["verdict"] == "untested"  # one lambda only
    assert found["(e)"]["verdict"] == "refuted"
    assert found["(f)"]["verdict"] == "refuted" and not math.isnan(
        found["(f)"]["numbers"]["pearson_erased_vs_synonyms"]
    )


@requires_noto
def test_uce_keeps_the_benign_prompts_it_is_given(model, finished):
    """The experiment's UCE edit (preserve set on) moves the keys and values of every benign
    candidate's tokens far less than the same edit without it."""
    import torch

    from bridge.realworld.protocol import default_tasks
    from bridge.unlearning.run import unlearn

    out, _ = finished
    task = default_tasks(model.world.concepts)["pistol"]
    kept = torch.load(out / "unlearned" / "pistol" / "uce_lam_0_1.pt", weights_only=True)
    bare = unlearn("uce", model.unet, model.text, model.scheduler, list(task.erased), lam=0.1,
                   from_token="first", progress=False)  # fmt: skip
    base, bare_p = dict(model.unet.named_parameters()), dict(bare.unet.named_parameters())
    with torch.no_grad():
        tokens = model.text.encode_prompts(list(task.preserved())).reshape(-1, 384).double()

        def moved(weights) -> float:  # relative change of the K/V outputs of the kept tokens
            num = sum(float(((weights[n].double() - base[n].double()) @ tokens.T).norm() ** 2) for n in kept)
            den = sum(float((base[n].double() @ tokens.T).norm() ** 2) for n in kept)
            return (num / den) ** 0.5

        with_set, without = moved(kept), moved({n: bare_p[n] for n in kept})
    assert kept and all(n.endswith(("to_k.weight", "to_v.weight")) for n in kept)
    assert with_set < 0.5 * without, (with_set, without)


def test_erasure_table_reads_targets_collateral_and_largest_return():
    from bridge.realworld.erasure import erasure_markdown, erasure_rows

    table = _table([0.2, 0.3, 0.4, 0.5], unlearned=0.15)
    for task, own in (("ship", 0.8), ("Statue of Liberty", 0.9)):
        for type_, algo, config, value in (("base", "base", "none", own), ("unlearned", "uce", "lam=0.1", 0.75)):
            table.add(algo=algo, task=task, config=config, finetune_algo="none", finetune_set="none",
                      prompts="others", seed=1337, type=type_, metric="own", value=value)  # fmt: skip
    rows = {r["task"]: r for r in erasure_rows(table)}
    ship = rows["ship"]
    assert (ship["base"], ship["unlearned"], ship["erased_ok"]) == (0.95, 0.15, False)
    assert ship["own_drop"] == pytest.approx(0.05) and ship["collateral_ok"]
    assert rows["Statue of Liberty"]["own_drop"] == pytest.approx(0.15)
    assert not rows["Statue of Liberty"]["collateral_ok"]
    # the largest return: bin3's 0.5 at step 10 (LoRA is met first), minus 0.15 after unlearning
    assert ship["max_recovery"] == pytest.approx(0.35) and ship["max_recovery_at"] == "lora bin3 step 10"
    text = erasure_markdown(list(rows.values()))
    assert "| ship | uce lam=0.1 | 0.95 | 0.15 **(missed)** |" in text
    assert "0.90 -> 0.75 **(missed)**" in text and text.count("(missed)") == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "tasks=['unicorn']"], "task 'unicorn' is not a task of this world"),
        (["--set", "recipes=['sgd']"], "`recipes` has 'sgd'; use 'lora' and/or 'full'."),
        (["--set", "full_ema=1.5"], "`full_ema` must be in [0, 1)"),
        (["--set", "methods=[]"], "`methods` is empty"),
        (["--set", "finetune_step=3"], "unknown key `finetune_step`"),
        (["--set", "uce_from_token='middle'"], "`uce_from_token` must be 'first' or 'last'"),
        (
            ["--set", "preserve_for=['esd-x']"],
            "`preserve_for` has 'esd-x'; only UCE and MACE take a preserve set.",
        ),
    ],
)
@requires_noto
def test_bad_experiment_input_is_one_line(trained, tmp_path, args, message):
    res = CliRunner().invoke(
        realworld_app, ["experiment", "--model", str(trained[0]), "--out", str(tmp_path), *args]
    )
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    res = CliRunner().invoke(realworld_app, ["experiment", "--model", str(tmp_path)])
    assert res.exit_code == 2
    assert re.search("is not a trained model folder", res.output) and len(
        res.output.strip().splitlines()
    ) == 1


def test_report_merges_folders_into_one_table_with_claims_and_figures(tmp_path):
    import json

    import torch

    table = _table([0.2, 0.3, 0.4, 0.5])
    folders = []
    for task in ("ship", "Statue of Liberty"):
        folder = tmp_path / task.replace(" ", "_")
        ResultsTable([r for r in table.rows if r["task"] == task]).to_csv(folder / "results.csv")
        (folder / "samples").mkdir()
        slug = task.replace(" ", "_").lower()
        for stem in ("base", "uce_lam_0_1__unlearned", "uce_lam_0_1__lora_bin3"):
            torch.save(torch.zeros(4, 3, 16, 16), folder / "samples" / f"{slug}__{stem}.pt")
        folders.append(str(folder))
    runner = CliRunner()
    res = runner.invoke(realworld_app, ["report", *folders])
    assert res.exit_code == 2 and "give `--out` to merge" in res.output
    out = tmp_path / "merged"
    res = runner.invoke(realworld_app, ["report", *folders, "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = ResultsTable.read_csv(out / "results.csv")
    def canon(rows):
        return sorted(tuple(sorted(r.items())) for r in rows)

    assert canon(merged.rows) == canon(table.rows)
    found = json.loads((out / "claims.json").read_text())
    assert found[0]["numbers"]["mean_recovery"] == pytest.approx(0.25)
    for png in ("resurgence.png", "resurgence_synonyms.png", "samples.png"):
        assert (out / png).stat().st_size > 10_000
    assert json.loads((out / "erasure.json").read_text())[0]["task"] == "ship"
    # the sample grid's fine-tuned column: the run that brought the most back (bin3, +0.4)
    from bridge.realworld.figures import _largest_returns

    assert _largest_returns(out)[("ship", "uce_lam_0_1")] == ("lora_bin3", pytest.approx(0.4))
    assert (out / "erasure.md").read_text().startswith("| task | unlearning |")
