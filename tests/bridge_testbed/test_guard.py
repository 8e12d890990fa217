"""The resurgence guard: projected steps against the projection computed by hand, first-order zero
readout change (second order left), removal reports, errors, resume, and the PGU-style baseline.

Float64 models throughout: a step is ~1e-4 of the weights it moves, so float32 storage would
blur orthogonality at 1e-3; in float64 round-off is ~1e-12 of the step (tolerance 1e-9).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from bridge.finetune import FinetuneConfig, FinetuneData, finetune
from bridge.groups import select_group
from bridge.guard import (
    GuardError,
    SubspaceGuard,
    forget_subspace_guard,
    orthonormal_basis,
    retain_core_guard,
)
from bridge.loss import FrozenDiffusionLoss, make_probe_batches
from bridge.probes import Probes
from bridge.readouts import ReadoutSet
from bridge.unlearn import apply_uce, uce_token_embeddings

TOL = 1e-9
SPEC = "cross-attn"


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(world, world_model):
    unet, text, sched = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1).double()
    base = copy.deepcopy(unet).double()
    g = torch.Generator().manual_seed(0)
    emb = text.encode_prompts(list(world.captions)).double()
    ids = torch.tensor([1, 2, 3] * 2)
    images = world.sample(ids, g).double()
    ft = make_probe_batches(images, emb[ids], sched.alphas_cumprod, batch_size=3, seed=3)
    forget_x = world.sample(torch.zeros(4, dtype=torch.long), g).double()
    forget = make_probe_batches(forget_x, emb[:1], sched.alphas_cumprod, batch_size=4, seed=4)
    retain = make_probe_batches(images[:3], emb[ids[:3]], sched.alphas_cumprod, batch_size=1,
                                seed=5)  # fmt: skip
    probes = Probes(finetune=ft, forget=forget, sampler=None, seed=0)
    stochastic = FinetuneData(images, emb[ids], text.encode_prompts([""]).double())
    return base, unlearned, FinetuneData(probe_batches=ft), stochastic, sched, probes, retain


def _cfg(**kw):
    return FinetuneConfig(
        **{"steps": 1, "lr": 0.05, "optimizer": "sgd", "trainable": SPEC, "full_batch": True, **kw}
    )


def _readout_gradients(base, unlearned, probes):
    group = select_group(unlearned, SPEC)
    rs = ReadoutSet(base, unlearned, group, probes)
    return rs, rs.gradients(("output_rho", "forget_loss_recovery")).gradients, group


def test_guarded_sgd_step_is_the_hand_projection_and_reports_what_it_removed(setup):
    base, unlearned, data, _, sched, probes, _ = setup
    _, grads, group = _readout_gradients(base, unlearned, probes)
    q, _ = np.linalg.qr(grads.T)  # independent basis of the same span
    g = FrozenDiffusionLoss(copy.deepcopy(unlearned), group, data.probe_batches).gradient()
    g = g.double().numpy()
    want = -0.05 * (g - q @ (q.T @ g))
    guard = forget_subspace_guard(base, probes, refresh_every=1)
    res = finetune(unlearned, data, _cfg(), scheduler=sched, guard=guard, progress=False)
    step = (group.values(res.unet) - group.values(unlearned)).numpy()
    assert np.linalg.norm(step - want) <= TOL * np.linalg.norm(want)
    removed = np.linalg.norm(q @ (q.T @ g)) / np.linalg.norm(g)
    assert res.guard_removed == pytest.approx([removed], rel=TOL)
    assert res.history[-1]["guard_removed"] == pytest.approx(removed, rel=TOL)
    assert 1e-6 < removed < 1 - 1e-6  # a real, partial removal


def test_guard_makes_the_readout_change_second_order_in_lr_for_sgd_and_adamw(setup):
    base, unlearned, data, _, sched, probes, _ = setup
    rs, grads, group = _readout_gradients(base, unlearned, probes)

    def change(optimizer, lr, guarded):
        guard = forget_subspace_guard(base, probes, refresh_every=1) if guarded else None
        res = finetune(unlearned, data, _cfg(optimizer=optimizer, lr=lr), scheduler=sched,
                       guard=guard, progress=False)  # fmt: skip
        theta = group.values(res.unet)
        step = (theta - rs.theta_u).numpy()
        return step, rs.values(theta, ("output_rho",))["output_rho"]

    for optimizer, lr in (("sgd", 0.02), ("adamw", 2e-4)):
        step, guarded = change(optimizer, lr, True)
        _, plain = change(optimizer, lr, False)
        # the applied step is orthogonal to the guarded gradients (first order zero) ...
        cos = np.abs(grads @ step) / (np.linalg.norm(grads, axis=1) * np.linalg.norm(step))
        assert cos.max() <= TOL, optimizer
        # ... so what is left is second order: halving lr quarters it, and halves plain's
        _, guarded_half = change(optimizer, lr / 2, True)
        _, plain_half = change(optimizer, lr / 2, False)
        assert guarded / guarded_half == pytest.approx(4.0, rel=0.1), optimizer
        assert plain / plain_half == pytest.approx(2.0, rel=0.1), optimizer
        assert abs(guarded) < 0.1 * abs(plain), optimizer


def test_resume_with_a_guard_equals_the_uninterrupted_run(setup, tmp_path):
    base, unlearned, _, data, sched, probes, _ = setup
    cfg = FinetuneConfig(steps=6, lr=1e-3, optimizer="adamw", batch_size=3, trainable=SPEC,
                         track_every=2, checkpoint_every=2)  # fmt: skip

    def guard():  # refresh at steps 0 and 3: the resumed run (from step 4) needs the saved basis
        return forget_subspace_guard(base, probes, refresh_every=3)

    full = finetune(unlearned, data, cfg, scheduler=sched, guard=guard(), progress=False)

    def stop_at_5(step):
        if step == 5:
            raise _Interrupt

    kw = dict(scheduler=sched, out_dir=tmp_path, progress=False)
    with pytest.raises(_Interrupt):
        finetune(unlearned, data, cfg, guard=guard(), on_step=stop_at_5, **kw)
    resumed = finetune(unlearned, data, cfg, guard=guard(), **kw)
    for (n, a), b in zip(full.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert resumed.history == full.history and resumed.guard_removed == full.guard_removed
    with pytest.raises(ValueError, match=re.escape("was written with another fine-tuning config")):
        finetune(unlearned, data, cfg, guard=forget_subspace_guard(base, probes, refresh_every=2),
                 **kw)  # fmt: skip


def test_retain_core_guard_keeps_the_retained_losses_to_first_order(setup):
    base, unlearned, data, _, sched, _, retain = setup
    group = select_group(unlearned, SPEC)
    rows = FrozenDiffusionLoss(copy.deepcopy(unlearned), group, retain).batch_gradients().numpy()
    guard = retain_core_guard(retain, energy=1.0, refresh_every=1)
    res = finetune(unlearned, data, _cfg(), scheduler=sched, guard=guard, progress=False)
    step = (group.values(res.unet) - group.values(unlearned)).numpy()
    cos = np.abs(rows @ step) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(step))
    assert cos.max() <= TOL
    assert guard.basis.shape[1] == len(retain)  # 3 independent per-batch gradients


def test_energy_threshold_is_theory_s_rule():
    from theory.guard import _range_basis

    rows = np.random.default_rng(0).normal(size=(4, 7)) * np.array([[3.0], [2.0], [1.0], [0.5]])
    for energy in (0.5, 0.8, 0.97, 1.0):
        ours = orthonormal_basis(rows, energy=energy)
        theirs = np.asarray(_range_basis(rows.T @ rows, energy))
        assert np.allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-10), energy
    assert orthonormal_basis(rows, energy=0.5).shape[1] < orthonormal_basis(rows).shape[1] == 4


def test_a_guard_that_removes_the_whole_update_is_a_clear_error(setup):
    base, unlearned, data, _, sched, _, _ = setup
    spec = r"down_blocks\.0\..*attn2\.to_k\.weight$"
    n = select_group(unlearned, spec).numel
    everything = SubspaceGuard("forget-subspace", lambda m, g: np.zeros((0, n)), extra=np.eye(n))
    with pytest.raises(GuardError, match=r"guard `forget-subspace` removed 100\.0+% of the update"):
        finetune(unlearned, data, _cfg(trainable=spec), scheduler=sched, guard=everything,
                 progress=False)  # fmt: skip


@pytest.mark.parametrize("refresh", [0, -3])
def test_refresh_interval_must_be_positive(refresh):
    msg = f"`refresh_every` (--guard-refresh) must be an integer >= 1 steps, got {refresh}."
    with pytest.raises(ValueError, match=re.escape(msg)):
        retain_core_guard([object()], refresh_every=refresh)


def test_guard_with_lora_is_refused(setup):
    base, unlearned, data, _, sched, probes, _ = setup
    guard = forget_subspace_guard(base, probes)
    cfg = dataclasses.replace(_cfg(), trainable="lora", full_batch=False)
    with pytest.raises(ValueError, match=re.escape("not trainable='lora'")):
        finetune(unlearned, data, cfg, scheduler=sched, guard=guard, progress=False)


def test_finetune_command_with_guards_and_its_one_line_errors(world, world_model, tmp_path):
    from typer.testing import CliRunner

    from bridge.data import save_caption_folder
    from bridge.tiny import save_tiny_pipeline
    from bridge.unlearn_io import save_unlearned
    from experiments.cli import app

    unet, text, sched = world_model
    folder = save_tiny_pipeline(tmp_path / "base", unet, text, scheduler=sched)
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    uce = save_unlearned(edited, tmp_path / "u", method="uce", args={}, seed=None, base_unet=unet)
    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    save_caption_folder(world.sample(torch.tensor([1, 2, 3]), g), list(world.captions[1:]), data)
    common = ["bridge", "finetune", "--base", str(folder), "--unlearned", str(uce), "--data",
              str(data), "--forget-prompt", "a red circle", "--forget-prompt", "red circle",
              "--steps", "2", "--lr", "1e-3", "--track-every", "1", "--batch-size", "2",
              "--trainable", "cross-attn"]  # fmt: skip
    from bridge.testbed.classifier import ConceptClassifier

    torch.manual_seed(0)
    clf = tmp_path / "classifier.pt"
    torch.save(ConceptClassifier(len(world.concepts), width=4).state_dict(), clf)
    presence = ["--classifier", str(clf), "--presence-class", "0", "--guard-seeds", "2",
                "--sample-steps", "2"]  # fmt: skip
    runner = CliRunner()
    for k, (guard, restore, label) in enumerate((
        (["forget-subspace"], True, "2 prompt(s): output_rho, forget_loss_recovery"),
        (["forget-subspace", "--no-guard-restore"], False, None),
        (["forget-subspace", *presence], True,
         "2 prompt(s): presence, presence_logprob; restores presence"),
        (["retain-core", "--retain-prompt", "a blue square"], False, None),
    )):  # fmt: skip
        out = tmp_path / f"{guard[0]}-{k}"
        res = runner.invoke(app, [*common, "--out", str(out), "--guard", *guard,
                                  "--guard-refresh", "1"])  # fmt: skip
        assert res.exit_code == 0, res.output
        hist = json.loads((out / "history.json").read_text())
        assert all(0 < h["guard_removed"] < 1 for h in hist[1:]), hist
        spec = json.loads((out / "manifest.json").read_text())["config"]["guard"]
        assert spec["guard"] == guard[0] and spec["restore"] is restore, spec
        assert label is None or spec["label"] == label, spec
    for extra, message in (
        (["--guard", "retain-core", "--retain-prompt", "x", *presence],
         "`--classifier` serves `--guard forget-subspace` only; add it."),
        (["--guard", "forget-subspace", "--classifier", str(clf)],
         "give `--classifier` and `--presence-class` together (presence)."),
        (["--guard", "forget-subspace", *presence[:3], "9"], "`--presence-class` 9 is out of"),
        (["--guard", "forget-subspace", *presence, "--guard-seeds", "0"],
         "`--guard-seeds` must be a finite number >= 1; got 0."),
        (["--guard-refresh", "0"], "`--guard-refresh` must be a finite number >= 1; got 0."),
        (["--guard", "retain-core"], "`--guard retain-core` needs at least one `--retain-prompt`."),
        (["--guard", "pgu"], "`--guard` must be one of none, forget-subspace, retain-core; got"),
    ):
        res = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), *extra])
        assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
        assert message in res.stderr


@pytest.fixture(scope="module")
def presence_case(setup, world_model):
    """A smooth float64 "classifier" on 4 DDIM seeds (finite differences stay at 1e-13)."""
    from bridge.probes import sampler_probe
    from bridge.sampler import sample_at

    base, unlearned, data, _, sched, probes, _ = setup
    smp = sampler_probe(world_model[1], "a red circle", scheduler=sched, seeds=range(4), steps=3,
                        guidance_scale=3.0)  # fmt: skip
    weights = torch.randn(3 * 8 * 8, 4, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)  # fmt: skip

    def log_probs(images):
        return torch.log_softmax(images.flatten(1).double() @ weights, dim=-1)

    group = select_group(unlearned, SPEC)

    def readouts(theta):  # (presence, presence_logprob) by forward sampling: no guard code
        with torch.no_grad():
            lp = log_probs(sample_at(unlearned, group, theta, smp))[:, 0]
        return torch.stack([lp.exp().mean(), lp.mean()])

    def guarded_run(steps, lr, restore, restore_readouts=None):
        guard = forget_subspace_guard(base, dataclasses.replace(probes, sampler=smp),
                                      log_probs=log_probs, concept=0, refresh_every=1,
                                      restore=restore,
                                      restore_readouts=restore_readouts)  # fmt: skip
        thetas = [group.values(unlearned)]
        finetune(unlearned, data, _cfg(steps=steps, lr=lr), scheduler=sched, guard=guard,
                 progress=False,
                 on_step=lambda _: thetas.append(group.values(guard.model).clone()))  # fmt: skip
        assert ": presence, presence_logprob" in guard.label and guard.basis.shape[1] == 2
        return guard, thetas

    loss = FrozenDiffusionLoss(copy.deepcopy(unlearned), group, data.probe_batches)
    return readouts, guarded_run, loss


def _directional(readouts, theta, step, eps=1e-3):
    """First-order change of the readouts along ``step`` by central differences."""
    return (readouts(theta + eps * step) - readouts(theta - eps * step)) / (2 * eps)


def test_projection_only_guard_keeps_presence_first_order_still_at_every_gd_step(presence_case):
    """With a classifier the guard holds the presence readouts only; refreshed every step, every
    projected GD step leaves presence and its log-probability unchanged to first order, checked
    by central differences of forward DDIM samples against plain GD's change."""
    readouts, guarded_run, loss = presence_case
    lr = 0.05
    _, thetas = guarded_run(3, lr, restore=False)
    for k, (a, b) in enumerate(zip(thetas, thetas[1:], strict=False)):
        plain = _directional(readouts, a, -lr * loss.gradient(a))
        assert plain.abs().min() > 1e-8, k  # plain GD does move both readouts
        change = _directional(readouts, a, b - a)
        assert (change.abs() <= 1e-6 * plain.abs()).all(), (k, change, plain)
    assert len(thetas) == 4


@pytest.mark.parametrize("restored", [None, ("presence", "presence_logprob")])
def test_restoring_guard_steps_cancel_the_rise_above_theta_u_to_first_order(presence_case,
                                                                            restored):  # fmt: skip
    """restore=True: each step's first-order change of the restored readouts (default: presence
    alone) is minus their rise above theta_u's values (the correction returns them to their
    level set; a readout that fell is held where it is); at step 0 there is nothing to correct,
    so the step is the plain projection. Finite differences of forward samples, no guard code."""
    readouts, guarded_run, loss = presence_case
    lr = 0.05
    guard, thetas = guarded_run(4, lr, restore=True, restore_readouts=restored)
    held = [0] if restored is None else [0, 1]  # (presence, presence_logprob) rows restored
    assert guard.label.endswith("; restores presence") is (restored is None), guard.label
    target = readouts(thetas[0])
    for k, (a, b) in enumerate(zip(thetas, thetas[1:], strict=False)):
        plain = _directional(readouts, a, -lr * loss.gradient(a))[held]
        drift = (readouts(a) - target)[held]
        rise = drift.clamp_min(0.0)
        change = _directional(readouts, a, b - a)[held]
        tol = 1e-6 * plain.abs() + 1e-3 * drift.abs()  # FD error, second-order remainder
        assert ((change + rise).abs() <= tol).all(), (k, change, drift)
        if k > 0:
            assert rise.max() > 1e-9, k  # there was second-order drift to correct
    assert len(guard.corrections) == 3  # steps 2-4: step 1 starts at theta_u
    # the drift after the run: one step's second-order term, not four accumulated
    _, unrestored = guarded_run(4, lr, restore=False)
    kept = (readouts(thetas[-1]) - target).abs()[held]
    lost = (readouts(unrestored[-1]) - target).abs()[held]
    assert (kept < 0.5 * lost).all(), (kept, lost)


def test_restored_readouts_must_be_guarded_ones(setup):
    base, _, _, _, _, probes, _ = setup
    for bad in (("presence",), ()):  # presence is not guarded without a classifier; empty
        with pytest.raises(ValueError, match="^`restore_readouts` must be a non-empty subset of"):
            forget_subspace_guard(base, probes, restore_readouts=bad)
