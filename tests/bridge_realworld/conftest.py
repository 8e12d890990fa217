"""Shared fixtures of the real-image testbed tests: a small world and the frozen MiniLM."""

from __future__ import annotations

import pytest
import torch

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
