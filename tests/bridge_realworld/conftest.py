"""Shared fixtures of the real-image testbed tests: a small world and the frozen MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bridge.realworld.world import RealWorld

# One thread: the test machine is shared, and oversubscribed OpenMP threads run ~10x slower.
torch.set_num_threads(1)

#: Smallest world the tests need: two CIFAR classes, an unsafe proxy, a landmark, both styles.
SMALL = ("dog", "cat", "pistol", "Statue of Liberty")


@pytest.fixture(scope="session")
def small_world():
    from tests.bridge_realworld._noto import NOTO_MISSING

    if NOTO_MISSING:
        pytest.skip(NOTO_MISSING)
    return RealWorld(concepts=SMALL, size=16)


@pytest.fixture(scope="session")
def minilm():
    from bridge.realworld.text import load_minilm

    return load_minilm(max_length=16)


#: A tiny training run (seconds): the bundle, CLI and experiment tests share.
TINY = [
    "concepts=['dog', 'cat', 'pistol']",
    "size=16",
    "steps=3",
    "checkpoint_every=2",
    "block_out_channels=[8, 16, 32]",
    "attention_head_dim=2",
    "classifier_steps=5",
    "classifier_per_pair=2",
    "classifier_width=8",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    import os

    from experiments.cli_bridge_realworld import realworld_app

    root = tmp_path_factory.mktemp("realworld")
    out, cwd = root / "model", os.getcwd()
    os.chdir(root)  # a RELATIVE --out, as users type it (fingerprints once broke on it)
    try:
        res = CliRunner().invoke(realworld_app, ["train", "--out", "model", *_sets(TINY)])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return out, json.loads(res.output[res.output.index("{") :])
