"""The parts of the unlearning methods against their definitions, on tiny random UNets.

Names shared with theory; v-prediction targets; SalUn moves only masked entries; Scissorhands
resets exactly the most sensitive entries; MACE's closed forms satisfy their normal equations;
every method is a function of its seed.
"""

from __future__ import annotations

import re

import pytest
import torch

from bridge.unlearning.compose import ComposedResult
from bridge.unlearning.data import (
    UnlearningData,
    diffusion_loss,
    noisy_batch,
    training_target,
)
from bridge.unlearning.mace import (
    MaceConcept,
    closed_form_refinement,
    find_matching_indices,
    fuse_loras,
    refinement_pairs,
)
from bridge.unlearning.mace_lora import LoRA
from bridge.unlearning.masks import top_entries
from bridge.unlearning.names import METHOD_NAMES, all_method_names, resolve_method_name
from bridge.unlearning.run import DATA_METHODS, unlearn
from bridge.unlearning.salun import salun
from bridge.unlearning.scissorhands import scissorhands

ERASE, KEEP = "a red circle", ["a blue circle", "a red square"]


def test_method_names_are_theorys():
    from theory.unlearning import METHOD_NAMES as THEORY

    assert METHOD_NAMES == THEORY
    assert resolve_method_name("esd-x") == (
        "esd_x",
        "method 'esd-x' is spelled 'esd_x' (the name theory uses); using esd_x.",
    )
    assert resolve_method_name("SHS").name == "scissorhands"
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown unlearning method 'macee'; did you mean mace? valid: "
            + ", ".join(all_method_names())
            + "."
        ),
    ):
        resolve_method_name("macee")


@pytest.fixture(scope="module")
def data(world):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0] * 4 + [2] * 2 + [1] * 2)  # red circle; blue circle, red square
    images = world.sample(ids, g)
    return UnlearningData(images[:4], [ERASE] * 4, images[4:], [KEEP[0]] * 2 + [KEEP[1]] * 2)


def test_v_prediction_changes_the_training_target(world_model, data):
    from diffusers import DDPMScheduler

    unet, text, _ = world_model
    v_sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    eps_sched = DDPMScheduler(num_train_timesteps=1000)
    batch = noisy_batch(data.forget_images, v_sched, torch.Generator().manual_seed(0), 4)
    v = training_target(v_sched, batch.x0, batch.noise, batch.t)
    torch.testing.assert_close(
        v, v_sched.get_velocity(batch.x0, batch.noise, batch.t), rtol=0, atol=0
    )
    assert not torch.allclose(v, batch.noise)
    cond = text.encode_prompts([ERASE] * 4)
    with torch.no_grad():
        pred = unet(batch.xt, batch.t, cond).sample
        got_v = diffusion_loss(unet, v_sched, batch, cond)
        got_eps = diffusion_loss(unet, eps_sched, batch, cond)
    torch.testing.assert_close(got_v, ((pred - v) ** 2).mean())
    torch.testing.assert_close(got_eps, ((pred - batch.noise) ** 2).mean())
    with pytest.raises(ValueError, match=re.escape("prediction_type 'sample' is not supported")):
        training_target(DDPMScheduler(prediction_type="sample"), batch.x0, batch.noise, batch.t)


def test_salun_moves_only_masked_entries(world_model, data):
    unet, text, sched = world_model
    res = salun(
        unet, text, sched, data, anchors=KEEP[0], lr=1e-3, steps=3, batch_size=2, progress=False
    )
    entries = res.selection.entries
    total = sum(p.numel() for p in unet.parameters())
    assert sum(int(m.sum()) for m in entries.values()) == int(0.5 * total)  # generate_mask's k
    moved = 0
    for (name, before), after in zip(unet.named_parameters(), res.unet.parameters(), strict=True):
        changed = before.detach() != after.detach()
        assert not (changed & ~entries[name]).any(), name  # nothing outside the mask moves
        moved += int(changed.sum())
    assert moved > 0.5 * int(0.5 * total)  # and most masked entries do (Adam moves any g != 0)
    with pytest.raises(ValueError, match=re.escape("`threshold` must be in (0, 1), got 1.5")):
        salun(unet, text, sched, data, anchors=KEEP[0], threshold=1.5, progress=False)


def test_scissorhands_resets_exactly_the_most_sensitive_entries(world_model, data):
    unet, text, sched = world_model
    res = scissorhands(
        unet,
        text,
        sched,
        data,
        anchors=KEEP[0],
        sparsity=0.99,
        prune_batches=3,
        batch_size=2,
        lr=1e-12,
        steps=1,
        seed=5,
        progress=False,
    )
    # SNIP scores recomputed here: the same three forget batches (seed 5), sum of |grad| per batch
    gen = torch.Generator().manual_seed(5)
    cond = text.encode_prompts([ERASE])
    params = dict(unet.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(3):
        batch = noisy_batch(data.forget_images, sched, gen, 2)
        loss = diffusion_loss(unet, sched, batch, cond.expand(2, -1, -1))
        for (n, _), g in zip(
            params.items(), torch.autograd.grad(loss, list(params.values())), strict=True
        ):
            acc[n] += g.abs()
    sensitivity = {n: (params[n].detach() * acc[n]).abs() for n in params}
    total = sum(s.numel() for s in sensitivity.values())
    want = top_entries(sensitivity, total - int(0.99 * total))
    got = res.selection.reset
    assert all(torch.equal(got[n], want[n]) for n in params)
    smallest_reset = min(float(sensitivity[n][want[n]].min()) for n in params if want[n].any())
    largest_kept = max(float(sensitivity[n][~want[n]].max()) for n in params if (~want[n]).any())
    assert smallest_reset >= largest_kept  # the k entries above every other one
    out = dict(res.unet.named_parameters())
    # reset to 0, then one Adam step of size lr = 1e-12 (Adam moves each entry by <= ~lr)
    assert max(float(out[n].detach()[want[n]].abs().max()) for n in params if want[n].any()) < 1e-9


def _double_text(world_model):
    import copy

    _, text, _ = world_model
    from bridge.tiny import TextEncoder

    return TextEncoder(text.tokenizer, copy.deepcopy(text.model).double())


def _gram_residual(w_new, w_ref, contexts, values, preserve, kept, lam, scale):
    """Relative residual of W (lam I + sum c c^T + s sum p p^T) = lam W_ref + sum v c^T + s sum u p^T,
    with every sum written out term by term."""
    d = contexts.shape[1]
    gram, rhs = lam * torch.eye(d, dtype=torch.float64), lam * w_ref
    for c, v in zip(contexts, values, strict=True):
        gram, rhs = gram + torch.outer(c, c), rhs + torch.outer(v, c)
    for p, u in zip(preserve, kept, strict=True):
        gram, rhs = gram + scale * torch.outer(p, p), rhs + scale * torch.outer(u, p)
    return float((w_new @ gram - rhs).norm() / rhs.norm())


def test_mace_closed_forms_satisfy_their_normal_equations(world_model):
    unet, _, _ = world_model
    base = __import__("copy").deepcopy(unet).double()
    text = _double_text(world_model)
    assert find_matching_indices([2, 4, 9, 5, 3], [2, 4, 5, 3]) == ([0, 1, 3, 4], [0, 1, 2, 3])
    erase, mapping, keep = ["a red circle", "a blue square"], ["a circle", "a square"], KEEP
    refined = closed_form_refinement(base, text, erase, mapping, keep, lam=0.3, preserve_scale=5.0)
    contexts, mapped = refinement_pairs(text, erase, mapping)
    keep_rows = text.encode_prompts(keep).reshape(-1, contexts.shape[1])
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w0 = base.get_submodule(name).weight.detach()
    w1 = refined.get_submodule(name).weight.detach()
    # float64 solve of a well-conditioned 16x16 system: round-off ~1e-14, so 1e-8 cannot be luck
    assert (
        _gram_residual(w1, w0, contexts, mapped @ w0.T, keep_rows, keep_rows @ w0.T, 0.3, 5.0)
        < 1e-8
    )
    assert not torch.allclose(w1, w0)
    # fusion: two LoRAs (random factors), each reproduced on its own concept's tokens
    gen = torch.Generator().manual_seed(0)
    loras = []
    for _ in range(2):
        factors = {}
        for n, m in refined.named_modules():
            if re.search(r"attn2\.to_[kv]$", n):
                d_out, d_in = m.weight.shape
                factors[n] = (
                    torch.randn(1, d_in, generator=gen, dtype=torch.float64),
                    torch.randn(d_out, 1, generator=gen, dtype=torch.float64),
                )
        loras.append(LoRA(factors))
    prompts = [["a red circle"], ["a blue square"]]
    fused = fuse_loras(refined, base, text, loras, prompts, keep, lam=0.3, preserve_scale=5.0)
    w2 = fused.get_submodule(name).weight.detach()
    rows = [text.encode_prompts(p).reshape(-1, contexts.shape[1]) for p in prompts]
    values = torch.cat([r @ (w1 + lo.delta(name)).T for r, lo in zip(rows, loras, strict=True)])
    assert (
        _gram_residual(w2, w1, torch.cat(rows), values, keep_rows, keep_rows @ w0.T, 0.3, 5.0)
        < 1e-8
    )


def test_mace_mass_erasure_of_ten_concepts(world_model):
    unet, text, sched = world_model
    colours, shapes = ("red", "blue"), ("circle", "square")
    prompts = [f"{w} {c} {s}" for w in ("a", "the", "an") for c in colours for s in shapes][:10]
    images = torch.zeros(1, 3, 8, 8)
    concepts = [MaceConcept(p, images, torch.ones(1, 1, 8, 8)) for p in prompts]
    out = unlearn(
        "mace",
        unet,
        text,
        sched,
        prompts,
        preserve=["a photo"],
        concepts=concepts,
        progress=False,
        lora_steps=1,
    )
    changed = {
        n
        for (n, a), b in zip(unet.named_parameters(), out.unet.parameters(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(re.search(r"attn2\.to_[kv]\.weight$", n) for n in changed)
    assert all(torch.isfinite(p).all() for p in out.unet.parameters())
    assert out.args["edited_group"] == "cross-attn-kv" and len(out.args["mapping"]) == 10
    with pytest.raises(ValueError, match=re.escape("`rank` must be >= 1 (LoRA rank), got 0")):
        unlearn(
            "mace", unet, text, sched, prompts[:1], concepts=concepts[:1], rank=0, progress=False
        )
    with pytest.raises(ValueError, match=re.escape("has 2 masks for 1 images; give one mask")):
        MaceConcept("a red circle", images, torch.ones(2, 1, 8, 8))


#: The cheapest settings that still run every part of each method.
TINY = {
    "uce": {},
    "uce_v": {},
    "esd_x": {"steps": 2, "ddim_steps": 3, "batch_size": 2},
    "esd_u": {"steps": 2, "ddim_steps": 3, "batch_size": 2},
    "sdd": {"steps": 2, "warmup": 1, "ddim_steps": 3, "ema_decay": 0.5},
    "salun": {"steps": 2, "batch_size": 2, "lr": 1e-3},
    "scissorhands": {"steps": 2, "batch_size": 2, "prune_batches": 1, "lr": 1e-3},
    "erasediff": {"epochs": 1, "k_steps": 1, "steps_per_epoch": 2, "batch_size": 2, "lr": 1e-3},
    "mace": {"lora_steps": 2, "lr": 1e-3},
}


@pytest.mark.parametrize("name", list(TINY))
def test_each_method_is_a_function_of_its_seed(world_model, data, name):
    unet, text, sched = world_model
    extra = {"data": data} if name in DATA_METHODS else {}
    if name == "mace":
        extra["concepts"] = [MaceConcept(ERASE, data.forget_images)]

    def run(seed):
        return unlearn(
            name,
            unet,
            text,
            sched,
            [ERASE],
            preserve=KEEP,
            seed=seed,
            progress=False,
            **extra,
            **TINY[name],
        ).unet

    a, b, c = run(0), run(0), run(1)
    same = [torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)]
    assert all(same), name
    assert any(
        not torch.equal(x, y) for x, y in zip(unet.parameters(), a.parameters(), strict=True)
    )
    if name not in ("uce", "uce_v"):  # closed forms have no draws
        assert any(
            not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True)
        )


def test_composed_result_is_named():
    assert ComposedResult._fields == ("unet", "selection")


def test_readme_method_table_is_the_codes():
    from pathlib import Path

    from bridge.unlearning.names import method_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert method_table_markdown() in readme
