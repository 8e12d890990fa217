"""The demo's AdamW stage measures rho over the group each method actually edited."""

from __future__ import annotations

import re

import pytest

from bridge.hygiene import check_group_covers_edit
from bridge.testbed.demo import DemoConfig
from bridge.testbed.stages import adamw_config
from bridge.unlearn import apply_uce, esd, uce_token_embeddings


def _esd(world_model, variant):
    unet, text, sched = world_model
    return esd(
        unet, text, sched, ["a red circle"], variant=variant, steps=2, lr=1e-3,
        ddim_steps=4, batch_size=2, progress=False,
    )


@pytest.mark.parametrize("method", ["esd-u", "esd-x", "uce"])
def test_adamw_stage_group_covers_the_methods_edit(world_model, method):
    """Run each method for real on a tiny UNet and check the stage's measured group against the
    tensors it changed (ESD-u edits none of cross-attention K/V, the group hard-coded before)."""
    unet, text, _ = world_model
    if method == "uce":
        edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), edit="kv")
    else:
        edited = _esd(world_model, method[-1])
    group = adamw_config(DemoConfig(), method).measured_group
    assert check_group_covers_edit(unet, edited, group, method=method).numel > 0
    if method == "esd-u":  # the old fixed group cannot measure ESD-u: delta is zero there
        zero = "delta = theta_u - theta_0 is zero over group 'cross-attn-kv'"
        with pytest.raises(ValueError, match=re.escape(zero)):
            check_group_covers_edit(unet, edited, "cross-attn-kv", method=method)
