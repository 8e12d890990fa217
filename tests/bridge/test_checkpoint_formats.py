"""Checkpoints as other tools publish them: CompVis / LDM keys, Lightning ``.ckpt`` pickles.

The LDM layout is written here by the inverse of diffusers' UNet mapping, built from the block
structure (not from diffusers' table), so the loader's conversion is checked against an
independent description of the same layout.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from bridge.loading import (
    checkpoint_layout,
    load_state_dict_file,
    load_unet_weights,
    load_unlearned_unet,
)
from bridge.tiny import build_tiny_unet

_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def to_ldm(key: str, config) -> str:
    """The CompVis name of a diffusers UNet tensor (SD block layout, as ``openaimodel.py``)."""
    per = config["layers_per_block"] + 1  # LDM counts each resnet and the down/up-sampler
    head, _, leaf = key.rpartition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "down_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w -> input_blocks.k.0.op.w
            return f"input_blocks.{(b + 1) * per}.0.op.{rest[-1]}"
        block = f"input_blocks.{1 + b * per + i}"
    elif parts[0] == "up_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":  # after the last layer: its .1 (no attention) or .2
            has_attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{rest[-1]}"
        block = f"output_blocks.{b * per + i}"
    else:  # mid_block.resnets.j -> middle_block.2j, mid_block.attentions.0 -> middle_block.1
        kind, i, rest = parts[1], int(parts[2]), parts[3:]
        return f"middle_block.{2 * i if kind == 'resnets' else 1}." + _inner(kind, rest)
    return f"{block}.{0 if kind == 'resnets' else 1}." + _inner(kind, rest)


def _inner(kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        return f"{_RESNET[rest[0]]}.{'.'.join(rest[1:])}"
    return ".".join(rest)  # transformer blocks keep their names


@pytest.fixture(scope="module")
def unlearned():
    return build_tiny_unet(3, sample_size=8)


def _ldm_checkpoint(unet):
    sd = {
        "model.diffusion_model." + to_ldm(k, unet.config): v.clone()
        for k, v in unet.state_dict().items()
    }
    assert len(sd) == len(unet.state_dict())  # the inverse is one-to-one
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)  # VAE: ignored
    sd["cond_stage_model.transformer.embeddings.weight"] = torch.zeros(4, 2)  # text: ignored
    return sd


class _Callback:
    """Stand-in for a Lightning callback object pickled into a checkpoint."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)
        self.monitor = "val/loss"


def _lightning_ckpt(
    path, state_dict, monkeypatch, module="pytorch_lightning.callbacks.model_checkpoint"
):
    """torch.save a Lightning-style dict whose callbacks pickle a class of ``module``."""
    parts = module.split(".")
    fakes = {
        ".".join(parts[: i + 1]): types.ModuleType(".".join(parts[: i + 1]))
        for i in range(len(parts))
    }
    cls = type("ModelCheckpoint", (_Callback,), {"__module__": module})
    fakes[module].ModelCheckpoint = cls
    with monkeypatch.context() as m:
        for name, fake in fakes.items():  # pickle imports the module and its parents
            m.setitem(sys.modules, name, fake)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(fakes[parent], child, fake)
        torch.save(
            {
                "state_dict": state_dict,
                "epoch": 3,
                "global_step": 1200,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {"ModelCheckpoint": cls()},
            },
            path,
        )
    assert module not in sys.modules  # loading below cannot import the class


def test_ldm_safetensors_and_lightning_ckpt_load_to_the_same_tensors(
    unlearned, tmp_path, monkeypatch
):
    sd = _ldm_checkpoint(unlearned)
    assert checkpoint_layout(sd) == "ldm"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "esd.safetensors")
    _lightning_ckpt(tmp_path / "esd.ckpt", sd, monkeypatch)
    base = build_tiny_unet(0, sample_size=8)  # another theta_0 of the same architecture
    want = unlearned.state_dict()
    for path in (tmp_path / "esd.safetensors", tmp_path / "esd.ckpt"):
        for got in (load_unlearned_unet(base, path), load_unet_weights(path, config=base.config)):
            assert got.state_dict().keys() == want.keys()
            for name, tensor in want.items():
                assert torch.equal(got.state_dict()[name], tensor), (path.name, name)


def test_pickled_objects_outside_the_allow_list_are_refused(unlearned, tmp_path, monkeypatch):
    sd = _ldm_checkpoint(unlearned)
    _lightning_ckpt(tmp_path / "odd.ckpt", sd, monkeypatch, module="mytrainer.hooks")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "pickles Python objects that torch.load(weights_only=True) will not build "
            "(mytrainer.hooks.ModelCheckpoint): unpickling them could run arbitrary code"
        ),
    ):
        load_state_dict_file(tmp_path / "odd.ckpt")


def test_ldm_weights_need_a_config_and_the_same_architecture(unlearned, tmp_path):
    sd = _ldm_checkpoint(unlearned)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ldm.safetensors")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "is a single CompVis/LDM weights file without a UNet config; give the base pipeline "
            "folder whose unet/config.json describes it"
        ),
    ):
        load_unet_weights(tmp_path / "ldm.safetensors")
    wider = build_tiny_unet(0, sample_size=8, cross_attention_dim=32)
    with pytest.raises(
        ValueError,
        match=r"architecture mismatch with .*ldm\.safetensors: tensor "
        r"'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight' "
        r"has shape \(8, 16\) there but \(8, 32\) in the config",
    ):
        load_unet_weights(tmp_path / "ldm.safetensors", config=wider.config)


def test_partial_ldm_checkpoint_changes_only_its_tensors(unlearned, tmp_path):
    # a UCE/MACE-style release: only the cross-attention K/V, under CompVis names
    kv = {k: v for k, v in unlearned.state_dict().items() if re.search(r"attn2\.to_[kv]\.", k)}
    sd = {
        "model.diffusion_model." + to_ldm(k, unlearned.config): v.contiguous()
        for k, v in kv.items()
    }
    save_file(sd, tmp_path / "kv.safetensors")
    base = build_tiny_unet(0, sample_size=8)
    got = load_unlearned_unet(base, tmp_path / "kv.safetensors").state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(got[name], kv.get(name, tensor)), name
