"""Loading local folders and state dicts; parameter groups; tiny pipeline round-trip; bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from bridge.groups import PRESETS, select_group
from bridge.loading import load_unet, load_unlearned_unet
from bridge.sd import TextEncoder, load_pipeline, load_text_encoder
from bridge.tiny import (
    build_tiny_text_encoder,
    build_tiny_unet,
    build_word_tokenizer,
    save_tiny_pipeline,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    unet = build_tiny_unet(0, sample_size=8)
    tok = build_word_tokenizer()
    text = TextEncoder(tok, build_tiny_text_encoder(tok))
    save_tiny_pipeline(folder, unet, text)
    return folder, unet, text


def _same(a, b):
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_pipeline_round_trip(saved):
    folder, unet, text = saved
    pipe = load_pipeline(folder)
    assert _same(pipe.unet, unet)
    assert _same(load_unet(folder / "unet"), unet)  # UNet folder or pipeline folder
    prompts = ["a photo of a cat", "unknownword dog", ""]
    torch.testing.assert_close(
        pipe.text_encoder.encode_prompts(prompts), text.encode_prompts(prompts), rtol=0, atol=0
    )
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_tokenizer_is_word_level_with_fixed_length():
    tok = build_word_tokenizer(["cat", "dog"], max_length=6)
    ids = tok(["Cat dog zebra"], padding="max_length", max_length=6).input_ids[0]
    assert ids == [2, 4, 5, 1, 3, 0]  # <bos> cat dog <unk> <eos> <pad>
    emb = TextEncoder(tok, build_tiny_text_encoder(tok, hidden_size=8)).encode_prompts(["cat"])
    assert emb.shape == (1, 6, 8)
    with pytest.raises(ValueError, match="`prompts` must be a non-empty list of strings"):
        TextEncoder(tok, build_tiny_text_encoder(tok, hidden_size=8)).encode_prompts("cat")


def test_broken_clip_tokenizer_folder_is_rejected(saved, tmp_path):
    folder, _, _ = saved
    import shutil

    shutil.copytree(folder / "text_encoder", tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    # A CLIP BPE folder whose vocabulary is truncated (what a failed offline copy looks like).
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=r"loaded with only \d+ entries \(< 1000\)"):
        load_text_encoder(tmp_path)


def test_partial_and_full_state_dicts(saved, tmp_path):
    _, base, _ = saved
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    edit = {name: torch.randn_like(base.state_dict()[name])}
    save_file(edit, tmp_path / "edit.safetensors")
    edited = load_unlearned_unet(base, tmp_path / "edit.safetensors")
    torch.testing.assert_close(edited.state_dict()[name], edit[name], rtol=0, atol=0)
    other = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    torch.testing.assert_close(edited.state_dict()[other], base.state_dict()[other], rtol=0, atol=0)
    assert not torch.equal(base.state_dict()[name], edit[name])  # base untouched
    torch.save(
        {"state_dict": {"unet." + k: v for k, v in edited.state_dict().items()}},
        tmp_path / "full.pt",
    )
    assert _same(load_unlearned_unet(base, tmp_path / "full.pt"), edited)


def test_errors_name_paths_and_tensors(saved, tmp_path):
    folder, base, _ = saved
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"UNet path does not exist: {missing}")):
        load_unet(missing)
    (tmp_path / "notunet").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"notunet is not a diffusers UNet folder: missing "
        r"config\.json",
    ):
        load_unet(tmp_path / "notunet")
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing config.json in {tmp_path}")):
        load_text_encoder(_copy_without(folder, tmp_path / "noenc", "text_encoder/config.json"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="describes 'AutoencoderKL', not a UNet2DConditionModel"):
        load_unet(tmp_path / "vae")
    nowts = _copy_without(folder, tmp_path / "nowts", "unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"missing UNet weights in {nowts / 'unet'}")
    ):
        load_unet(nowts)
    with pytest.raises(FileNotFoundError, match="unlearned weights path does not exist"):
        load_unlearned_unet(base, missing)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    save_file({name: torch.zeros(3, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} has shape (3, 3)")):
        load_unlearned_unet(base, tmp_path / "bad.safetensors")
    bigger = build_tiny_unet(0, sample_size=8, cross_attention_dim=32)
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(
        ValueError,
        match=r"architecture mismatch .*tensor 'down_blocks\.0\.attentions"
        r"\.0\.transformer_blocks\.0\.attn2\.to_k\.weight'",
    ):
        load_unlearned_unet(base, tmp_path / "bigger")


def _copy_without(folder, dest, rel):
    import shutil

    shutil.copytree(folder, dest)
    (dest / rel).unlink()
    return dest


def test_groups_presets_and_empty_group(saved):
    _, base, _ = saved
    kv = select_group(base, "cross-attn-kv")
    assert all(re.search(r"attn2\.to_[kv]\.weight$", n) for n in kv.names) and len(kv.names) == 8
    assert set(kv.names) < set(select_group(base, "cross-attn").names)
    assert set(select_group(base, "cross-attn").names) < set(select_group(base, "attn").names)
    assert select_group(base, "all").numel == sum(p.numel() for p in base.parameters())
    flat = kv.values(base)
    assert torch.equal(kv.flatten(kv.unflatten(flat)), flat)
    with pytest.raises(ValueError, match=re.escape("available presets: " + ", ".join(PRESETS))):
        select_group(base, "attn3")
    with pytest.raises(ValueError, match=re.escape(f"expected ({kv.numel},)")):
        kv.unflatten(flat[:-1])


def test_method_group_presets_cover_what_the_methods_edit(saved):
    from bridge.unlearning.masks import PARAMETER_SETS

    _, base, _ = saved
    names = [n for n, _ in base.named_parameters()]
    # ESD-u's "noxattn" set, and UCE-V's V projections, as bridge.groups presets
    assert select_group(base, "non-cross-attn").names == tuple(
        n for n in names if PARAMETER_SETS["noxattn"](n)
    )
    assert select_group(base, "cross-attn-v").names == tuple(
        n for n in names if PARAMETER_SETS["v"](n)
    )
    assert not set(select_group(base, "non-cross-attn").names) & set(
        select_group(base, "cross-attn").names
    )
