"""The resurgence audit: a known ranking, the law's three factors against theory.law, the report,
and its one-line input errors."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from bridge.audit import Candidate, audit, audit_markdown, load_candidates, plot_audit
from bridge.data import save_caption_folder
from bridge.loss import make_probe_batches, teacher_targets
from bridge.unlearn import apply_uce, uce_token_embeddings


@pytest.fixture(scope="module")
def setup(world, world_model):
    unet, text, sched = world_model
    base = copy.deepcopy(unet).double()
    unlearned = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1).double()
    g = torch.Generator().manual_seed(0)
    emb = text.encode_prompts(list(world.captions)).double()
    # forget loss against the base model's own outputs: L_f(theta_0) = 0 < L_f(theta_u)
    x0 = world.sample(torch.zeros(6, dtype=torch.long), g).double()
    forget = teacher_targets(
        base, make_probe_batches(x0, emb[:1], sched.alphas_cumprod, batch_size=6, seed=4)
    )
    cands = [Candidate("forget set itself", probes=tuple(forget))]
    for i in (1, 2, 3):
        imgs = world.sample(torch.full((6,), i), g).double()
        cands.append(Candidate(world.captions[i], imgs, (world.captions[i],) * 6))
    return base, unlearned, text, sched, forget, cands


def test_candidate_identical_to_the_forget_set_ranks_first(setup):
    base, unlearned, text, sched, forget, cands = setup
    report = audit(base, unlearned, text, sched, cands, forget_batches=forget, lrs=[0.05],
                   steps=[1, 4], rank_by="forget_loss_recovery", top_k=3)  # fmt: skip
    assert report.ranking[0] == "forget set itself", report.ranking
    top = report.get("forget set itself")
    assert top.score > 0  # GD on L_f itself lowers L_f: recovery > 0
    # the score is the prediction's value at the reference point (lrs[0], max(steps))
    assert top.score == pytest.approx(float(top.prediction.get("forget_loss_recovery")[0, -1]))
    assert top.predictor == "krylov" and top.hvps["krylov"] == 4


def test_the_three_factors_multiply_to_the_law_of_theory(setup):
    import jax

    from theory.law import gd_amplification

    base, unlearned, text, sched, forget, cands = setup
    k, lr, steps = 3, 0.05, 6
    report = audit(base, unlearned, text, sched, cands[1:3], forget_batches=forget, lrs=[lr],
                   steps=[2, steps], top_k=k, krylov_max=0, top_directions=k)  # fmt: skip
    for c in report.candidates:
        assert c.predictor == "closure" and len(c.directions) == k  # the GGN: top end only
        with jax.enable_x64(True):
            amps = np.asarray(
                gd_amplification(np.array([d.eigenvalue for d in c.directions]), lr, [steps])
            )[0]
        for d, a in zip(c.directions, amps, strict=True):
            assert d.amplification == pytest.approx(float(a), rel=1e-12)
            assert d.contribution == pytest.approx(
                -d.amplification * d.gradient_overlap * d.forget_overlap, rel=1e-12
            )
        # every eigen-term plus the closure is theory.law's truncated prediction at (lr, T)
        total = sum(d.contribution for d in c.directions) + c.closure
        want = c.prediction.change[c.prediction.names.index("output_rho"), 0, -1]
        assert total == pytest.approx(float(want), rel=1e-9, abs=1e-15)
        assert abs(want) > 0


def test_markdown_and_figure(setup, tmp_path):
    base, unlearned, text, sched, forget, cands = setup
    report = audit(base, unlearned, text, sched, cands[:2], forget_batches=forget, lrs=[0.05],
                   steps=[1, 2], top_k=2)  # fmt: skip
    md = audit_markdown(report)
    first, second = report.ranking
    assert md.index(f"| 1 | {first} |") < md.index(f"| 2 | {second} |")
    assert md.count("| closure |") == 2
    png = plot_audit(report, tmp_path / "audit.png")
    assert png.stat().st_size > 10_000
    assert report.to_dict()["ranking"] == list(report.ranking)


def test_bad_candidates_are_one_line_errors(setup, tmp_path, world):
    base, unlearned, text, sched, forget, _ = setup
    with pytest.raises(ValueError, match=re.escape("no candidate fine-tuning sets")):
        audit(base, unlearned, text, sched, [], forget_batches=forget, lrs=[0.1], steps=[1])
    with pytest.raises(ValueError, match=re.escape("no candidate fine-tuning sets")):
        load_candidates([], size=8)
    folder = save_caption_folder(torch.zeros(2, 3, 8, 8), ["a", "b"], tmp_path / "c")
    (folder / "00001.txt").unlink()
    with pytest.raises(ValueError, match=re.escape(
        f"candidate '{folder}': caption files do not match images in {folder}: 1 image(s) without"
    )):  # fmt: skip
        load_candidates([folder], size=8)
    with pytest.raises(ValueError, match=re.escape("candidate 'x': 2 images but 1 captions")):
        Candidate("x", torch.zeros(2, 3, 8, 8), ("a",))


def test_audit_command_writes_report_and_refuses_bad_candidates(world, world_model, tmp_path):
    from typer.testing import CliRunner

    from bridge.tiny import save_tiny_pipeline
    from bridge.unlearn_io import save_unlearned
    from experiments.cli import app

    unet, text, sched = world_model
    folder = save_tiny_pipeline(tmp_path / "base", unet, text, scheduler=sched)
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    uce = save_unlearned(edited, tmp_path / "u", method="uce", args={}, seed=None, base_unet=unet)
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in (1, 2):
        dirs.append(save_caption_folder(world.sample(torch.full((2,), i), g),
                                        [world.captions[i]] * 2, tmp_path / f"c{i}"))  # fmt: skip
    args = ["bridge", "audit", "--base", str(folder), "--unlearned", str(uce),
            "--forget-prompt", "a red circle", "--lrs", "0.05", "--steps", "1,2", "--top-k", "2",
            "--forget-images", "2", "--sample-steps", "2"]  # fmt: skip
    runner = CliRunner()
    out = tmp_path / "audit"
    cands = [x for d in dirs for x in ("--finetune-data", str(d))]
    res = runner.invoke(app, [*args, *cands, "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "audit.json").read_text())
    assert sorted(report["ranking"]) == ["c1", "c2"] and report["rank_by"] == "output_rho"
    assert (out / "audit.png").stat().st_size > 10_000 and "| 1 |" in (out / "audit.md").read_text()
    (dirs[1] / "00000.png").unlink()
    res = runner.invoke(app, [*args, *cands, "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "caption files do not match images" in res.stderr and "c2" in res.stderr


def test_audit_command_ranks_by_presence_with_a_testbed_classifier(world, world_model, tmp_path):
    from typer.testing import CliRunner

    from bridge.testbed.classifier import ConceptClassifier
    from bridge.tiny import save_tiny_pipeline
    from bridge.unlearn_io import save_unlearned
    from experiments.cli import app

    unet, text, sched = world_model
    folder = save_tiny_pipeline(tmp_path / "base", unet, text, scheduler=sched)
    edited = apply_uce(unet, uce_token_embeddings(text, ["a red circle"]), lam=0.1)
    uce = save_unlearned(edited, tmp_path / "u", method="uce", args={}, seed=None, base_unet=unet)
    torch.manual_seed(0)
    clf = tmp_path / "classifier.pt"
    torch.save(ConceptClassifier(len(world.concepts), width=4).state_dict(), clf)
    g = torch.Generator().manual_seed(0)
    dirs = [save_caption_folder(world.sample(torch.full((2,), i), g), [world.captions[i]] * 2,
                                tmp_path / f"c{i}") for i in (1, 2)]  # fmt: skip
    args = ["bridge", "audit", "--base", str(folder), "--unlearned", str(uce),
            "--forget-prompt", "a red circle", "--lrs", "0.05", "--steps", "1,2", "--top-k", "2",
            "--forget-images", "2", "--sample-steps", "2", "--presence-seeds", "3",
            *[x for d in dirs for x in ("--finetune-data", str(d))]]  # fmt: skip
    runner = CliRunner()
    out = tmp_path / "audit"
    res = runner.invoke(app, [*args, "--classifier", str(clf), "--presence-class", "0",
                              "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "audit.json").read_text())
    assert report["rank_by"] == "presence" and "presence" in report["values_unlearned"]
    scores = {c["name"]: c["score"] for c in report["candidates"]}
    assert report["ranking"] == sorted(scores, key=lambda n: -scores[n])
    for c in report["candidates"]:  # the score is the presence generated at the predicted point
        assert c["score"] == pytest.approx(c["predicted_at_points"]["presence"][0][-1])
    for extra, message in (
        (["--classifier", str(clf)], "give `--classifier` and `--presence-class` together"),
        (["--classifier", str(clf), "--presence-class", "9"], "`--presence-class` 9 is out of"),
        (["--classifier", str(dirs[0]), "--presence-class", "0"], "is not a file"),
    ):
        res = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
        assert message in res.stderr, res.stderr
