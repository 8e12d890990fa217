"""UCE against its closed form evaluated directly; ESD's target against its definition."""

from __future__ import annotations

import re

import pytest
import torch

from bridge.unlearn import (
    UCE_EDITS,
    apply_uce,
    esd,
    esd_target,
    uce_closed_form,
    uce_token_embeddings,
)


def _direct_uce(w0, e, a, p, lam):
    """The published formula term by term: sums of outer products, then an explicit inverse."""
    d = w0.shape[1]
    lhs = lam * w0
    gram = lam * torch.eye(d, dtype=torch.float64)
    for ce, ca in zip(e, a, strict=True):
        lhs = lhs + torch.outer(w0 @ ca, ce)
        gram = gram + torch.outer(ce, ce)
    for cp in p:
        lhs = lhs + torch.outer(w0 @ cp, cp)
        gram = gram + torch.outer(cp, cp)
    return lhs @ torch.linalg.inv(gram)


def test_uce_closed_form_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    e, a = (
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    )
    p = torch.randn(2, 7, generator=g, dtype=torch.float64)
    got = uce_closed_form(w0, e, a, p, lam=0.3)
    # float64 solve vs explicit inverse of a well-conditioned 7x7 system: round-off ~1e-14
    torch.testing.assert_close(got, _direct_uce(w0, e, a, p, 0.3), rtol=1e-10, atol=1e-12)


def test_uce_maps_erased_keys_to_anchor_outputs_and_keeps_preserved():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 10, generator=g, dtype=torch.float64)
    e, a = (
        torch.randn(2, 10, generator=g, dtype=torch.float64),
        torch.randn(2, 10, generator=g, dtype=torch.float64),
    )
    p = torch.randn(3, 10, generator=g, dtype=torch.float64)
    w = uce_closed_form(w0, e, a, p, lam=1e-9)
    # 5 constraints in 10 dims are exactly satisfiable; the ridge bias is O(lam) = 1e-9
    torch.testing.assert_close(w @ e.T, w0 @ a.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(w @ p.T, w0 @ p.T, rtol=0, atol=1e-6)


def test_uce_shape_errors():
    w0 = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=re.escape("must be row-aligned")):
        uce_closed_form(w0, torch.zeros(2, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=re.escape("`erase` must be (n_e, 4)")):
        uce_closed_form(w0, torch.zeros(2, 5), torch.zeros(2, 5))


def test_apply_uce_edits_every_cross_attention_kv_with_the_closed_form(world_model):
    unet, text, _ = world_model
    concepts = uce_token_embeddings(text, ["a red circle"], ["a blue circle"], ["a red square"])
    edited = apply_uce(unet, concepts, edit="kv", lam=0.1)
    before, after = dict(unet.named_parameters()), dict(edited.named_parameters())
    n_edited = 0
    for name, p in before.items():
        if re.search(r"attn2\.to_[kv]\.weight$", name):
            want = uce_closed_form(
                p.detach(), concepts.erase, concepts.anchor, concepts.preserve, lam=0.1
            )
            torch.testing.assert_close(after[name], want)
            n_edited += 1
        else:  # nothing else moves
            assert torch.equal(p, after[name]), name
    assert n_edited == 2 * sum(1 for n in before if n.endswith("attn2.to_k.weight"))


def test_apply_uce_v_only_leaves_keys(world_model):
    unet, text, _ = world_model
    concepts = uce_token_embeddings(text, ["a red circle"])
    edited = apply_uce(unet, concepts, edit="v")
    p0, p1 = dict(unet.named_parameters()), dict(edited.named_parameters())
    k = [n for n in p0 if n.endswith("attn2.to_k.weight")]
    v = [n for n in p0 if n.endswith("attn2.to_v.weight")]
    assert all(torch.equal(p0[n], p1[n]) for n in k)
    assert all(not torch.equal(p0[n], p1[n]) for n in v)
    with pytest.raises(ValueError, match=re.escape(f"`edit` must be one of {sorted(UCE_EDITS)}")):
        apply_uce(unet, concepts, edit="q")


def test_uce_token_pairs_follow_the_uce_convention(world_model):
    _, text, _ = world_model
    seq = text.tokenizer.model_max_length
    c = uce_token_embeddings(
        text, ["a red circle", "a blue square"], ["a circle", ""], ["a red square"]
    )
    emb = text.encode_prompts(
        ["a red circle", "a circle", "a blue square", "", "a red square"]
    ).double()
    # "a red circle": last word at index 3; "a circle": at 2 -> tails of length seq - 3, aligned
    torch.testing.assert_close(c.erase[: seq - 3], emb[0, 3:])
    torch.testing.assert_close(c.anchor[: seq - 3], emb[1, 2 : seq - 1])
    # empty anchor: UCE starts at index 0 (<bos>); the pair keeps seq - 3 rows
    torch.testing.assert_close(c.anchor[seq - 3 :], emb[3, : seq - 3])
    torch.testing.assert_close(c.preserve, emb[4, 3:])
    first = uce_token_embeddings(text, ["a red circle"], ["a blue circle"], from_token="first")
    emb2 = text.encode_prompts(["a red circle", "a blue circle"]).double()
    torch.testing.assert_close(first.erase, emb2[0, 1:])  # every token after <bos>
    torch.testing.assert_close(first.anchor, emb2[1, 1:])
    with pytest.raises(ValueError, match=re.escape("`erase` must be a non-empty list of prompts")):
        uce_token_embeddings(text, [])
    with pytest.raises(ValueError, match=re.escape("`anchors` has 2 prompts for 1 erased prompts")):
        uce_token_embeddings(text, ["a red circle"], ["", ""])


def test_esd_target_equals_definition():
    g = torch.Generator().manual_seed(0)
    e0, ec = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    got = esd_target(e0, ec, 1.5)
    torch.testing.assert_close(got, e0 - 1.5 * (ec - e0))
    # g = 0: the target is the unconditional prediction (the concept is mapped to "nothing")
    torch.testing.assert_close(esd_target(e0, ec, 0.0), e0)


@pytest.mark.parametrize("variant", ["x", "u"])
def test_esd_trains_only_its_mask(world_model, variant):
    unet, text, sched = world_model
    out = esd(
        unet,
        text,
        sched,
        ["a red circle"],
        variant=variant,
        steps=3,
        lr=1e-3,
        ddim_steps=4,
        batch_size=2,
        progress=False,
    )
    changed = {
        n
        for (n, a), b in zip(unet.named_parameters(), out.parameters(), strict=True)
        if not torch.equal(a, b)
    }
    xattn = {n for n in changed if "attn2" in n}
    if variant == "x":
        assert changed and changed == xattn
    else:
        assert changed and not xattn and not any("time_emb" in n for n in changed)
    with pytest.raises(
        ValueError, match=re.escape("`concepts` must be a non-empty list of prompts")
    ):
        esd(unet, text, sched, [], steps=1)
