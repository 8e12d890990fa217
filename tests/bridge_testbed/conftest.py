"""Shared tiny models for the testbed tests: built from configs, never downloaded."""

from __future__ import annotations

import pytest
import torch

from bridge.testbed.train import ModelConfig, build_world_model
from bridge.testbed.world import ConceptWorld

# One thread: the test machine is shared, and oversubscribed OpenMP threads run ~10x slower.
torch.set_num_threads(1)

#: Smallest world and model the tests need (seconds on one core).
TEST_WORLD = ConceptWorld(
    colours=("red", "blue"), shapes=("circle", "square"), backgrounds=("black",), size=8, jitter=1
)
TEST_MODEL = ModelConfig(
    block_out_channels=(8, 16),
    text_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
    text_layers=1,
    max_length=6,
)


@pytest.fixture(scope="session")
def world():
    return TEST_WORLD


@pytest.fixture(scope="session")
def world_model():
    """(unet, text_encoder, scheduler) with random weights, float32."""
    torch.manual_seed(0)
    return build_world_model(TEST_WORLD, TEST_MODEL)
