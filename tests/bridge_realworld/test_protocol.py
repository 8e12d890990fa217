"""The authors' protocol: similarity bins, fine-tuning sets, recipes, prompt groups, results table."""

from __future__ import annotations

import re

import pytest

from bridge.realworld.concepts import CONCEPTS
from bridge.realworld.protocol import (
    FULL,
    LORA,
    FinetuneRecipe,
    Protocol,
    default_tasks,
    similarity_bins,
)
from bridge.realworld.table import COLUMNS, ResultsTable, checkpoint_type, step_of

ALL = [c.name for c in CONCEPTS]


def test_bins_are_equal_width_between_min_and_max():
    names = list("abcdefgh")
    sims = [0.0, 0.1, 0.26, 0.3, 0.55, 0.6, 0.8, 1.0]
    bins = similarity_bins(names, sims, n_bins=4)
    assert [b.concepts for b in bins] == [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]
    assert [(b.low, b.high) for b in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert bins[-1].concepts[-1] == "h"  # the maximum belongs to the last bin
    assert [b.label for b in bins] == ["bin0", "bin1", "bin2", "bin3"]


def test_quantile_bins_have_equal_counts():
    names = list("abcdefghij")
    sims = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.5, 1.0]
    bins = similarity_bins(names, sims, n_bins=4, binning="quantile")
    assert [b.concepts for b in bins] == [("a", "b", "c"), ("d", "e", "f"), ("g", "h"), ("i", "j")]
    assert (bins[3].low, bins[3].high) == (0.5, 1.0)
    with pytest.raises(
        ValueError, match=re.escape("`binning` must be one of width, quantile, got 'log'.")
    ):
        similarity_bins(names, sims, binning="log")


def test_an_empty_bin_is_named_with_its_range():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "similarity bin 1 of 4 [0.250, 0.500) has no concepts (similarities to 'ship' of the "
            "4 candidates span 0.000..1.000); use fewer bins (`n_bins`) or more candidate concepts."
        ),
    ):
        similarity_bins(["a", "b", "c", "d"], [0.0, 0.1, 0.6, 1.0], n_bins=4, erased="ship")


def test_minilm_bins_put_similar_concepts_high(minilm):
    tasks = default_tasks(ALL)
    assert set(tasks) == {
        "ship", "Santa Claus", "pistol", "bomb", "Statue of Liberty", "OpenMoji style"
    }
    protocol = Protocol(max_per_bin=None)
    bins = protocol.bins(tasks["ship"], minilm.similarity)
    assert len(bins) == 4 and sum(len(b.concepts) for b in bins) == len(ALL) - 1
    assert "ship" not in {c for b in bins for c in b.concepts}
    assert "sailboat" in bins[-1].concepts  # the nearest meaning lands in the top bin
    assert "sailboat" not in bins[0].concepts and "pizza" not in bins[-1].concepts
    capped = Protocol(max_per_bin=3).bins(tasks["ship"], minilm.similarity)
    assert all(len(b.concepts) <= 3 for b in capped)
    assert capped == Protocol(max_per_bin=3).bins(tasks["ship"], minilm.similarity)  # seeded


def test_finetune_set_is_templates_times_seeds_with_fresh_seeds(minilm):
    task = default_tasks(ALL)["pistol"]
    protocol = Protocol()
    bin_ = protocol.bins(task, minilm.similarity)[2]
    pairs = protocol.finetune_set(task, bin_)
    assert len(pairs) == len(bin_.concepts) * 5 * 5  # 5 templates x 5 seeds a concept
    seeds = [s for _, s in pairs]
    assert len(set(seeds)) == len(seeds)
    assert not set(seeds) & set(protocol.eval_seeds(100))
    assert all("pistol" not in p for p, _ in pairs)


def test_prompt_groups_erased_synonyms_others():
    task = default_tasks(ALL)["ship"]
    groups = Protocol().prompt_groups(task)
    assert groups.erased[:2] == ("a ship", "a photo of a ship")
    assert "a photo of a vessel" in groups.synonyms and len(groups.synonyms) == 15
    assert len(groups.others) == 5 and not any("ship" in p for p in groups.others)
    assert groups == Protocol().prompt_groups(task)
    style = default_tasks(ALL)["OpenMoji style"]
    assert all(p.endswith(" in OpenMoji style") for p in style.erased)
    assert all(ps[0].endswith(" in Noto style") for ps in style.candidates.values())


def test_tasks_carry_their_anchors_and_preserve_set():
    import dataclasses

    tasks = default_tasks(ALL)
    style, ship = tasks["OpenMoji style"], tasks["ship"]
    # the style is erased by mapping each prompt to the same concept drawn by the other vendor
    assert style.anchors[0] == "an airplane in Noto style" and len(style.anchors) == len(style.erased)
    assert ship.anchors == ()  # concepts: the null prompt, UCE's and MACE's default
    kept = ship.preserved()
    assert len(kept) == 5 * (len(ALL) - 1) and "a photo of a sailboat" in kept
    assert not any("ship" in p for p in kept)
    with pytest.raises(ValueError, match=re.escape("task 'ship': 2 anchors for 5 erased prompts")):
        dataclasses.replace(ship, anchors=("a", "b"))


def test_recipes_are_the_authors():
    assert (LORA.algo, LORA.lr, LORA.schedule, LORA.steps, LORA.grad_clip, LORA.lora_rank) == (
        "lora",
        1e-4,
        "cosine",
        1000,
        1.0,
        4,
    )
    assert (FULL.algo, FULL.lr, FULL.schedule, FULL.ema_decay) == ("full", 1e-5, "constant", 0.9999)
    assert LORA.checkpoints == tuple(range(0, 1001, 100)) and Protocol().seed == 1337
    with pytest.raises(
        ValueError, match=re.escape("`lora_rank` is set exactly when `algo` is 'lora'.")
    ):
        FinetuneRecipe("full", 1e-5, "constant", lora_rank=4)


def _row(**change):
    row = dict(
        algo="uce",
        task="ship",
        config="lam=0.1",
        finetune_algo="lora",
        finetune_set="bin3",
        prompts="synonyms",
        seed=1337,
        type=checkpoint_type(200),
        metric="presence",
        value=0.25,
    )
    row.update(change)
    return row


def test_results_table_round_trips_with_the_authors_columns(tmp_path):
    assert COLUMNS == (
        "algo",
        "task",
        "config",
        "finetune_algo",
        "finetune_set",
        "prompts",
        "seed",
        "type",
        "metric",
        "value",
    )
    table = ResultsTable(
        [_row(), _row(type="unlearned", finetune_algo="none", finetune_set="none", value=1 / 3)]
    )
    path = table.to_csv(tmp_path / "results.csv")
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = ResultsTable.read_csv(path)
    assert back.rows == table.rows  # values exact (repr of the float)
    assert step_of(back.rows[0]["type"]) == 200 and step_of("unlearned") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompts": "erase"}, "`prompts` must be one of erased, synonyms, others, got 'erase'."),
        (
            {"finetune_algo": "qlora"},
            "`finetune_algo` must be one of lora, full, none, got 'qlora'.",
        ),
        ({"type": "step100"}, "`type` must be 'base', 'unlearned' or 'step=<n>', got 'step100'."),
        ({"value": float("nan")}, "`value` must be finite, got nan (presence)."),
        ({"task": ""}, "`task` must be a non-empty string without outer spaces, got ''."),
    ],
)
def test_bad_rows_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ResultsTable().add(**_row(**change))


def test_merging_tables_keeps_a_shared_row_once_and_refuses_a_conflict():
    base = _row(algo="base", config="none", type="base", finetune_algo="none", finetune_set="none")
    uce, esd = _row(value=0.25), _row(algo="esd-x", config="default", value=0.5)
    merged = ResultsTable.merge([ResultsTable([base, uce]), ResultsTable([base, esd])])
    assert [r["algo"] for r in merged.rows] == ["base", "uce", "esd-x"]
    with pytest.raises(ValueError, match="two runs disagree on .*'algo': 'base'.*0.5 vs 0.75"):
        ResultsTable.merge([ResultsTable([{**base, "value": 0.5}]), ResultsTable([{**base, "value": 0.75}])])


def test_missing_columns_and_foreign_csv(tmp_path):
    row = _row()
    del row["config"]
    with pytest.raises(ValueError, match=re.escape("missing ['config'], unknown ['step']")):
        ResultsTable().add(**row, step=3)
    bad = tmp_path / "other.csv"
    bad.write_text("method,value\nuce,1\n")
    with pytest.raises(
        ValueError,
        match=re.escape(f"{bad} is not a results table: its header is ['method', 'value']"),
    ):
        ResultsTable.read_csv(bad)
