"""Issue 13 on the tiny circles testbed: the resurgence audit's ranking against measured presence,
and plain vs guarded (forget-subspace, PGU-style retain-core) fine-tuning, GD and AdamW.

The base model, classifier and unlearned UNets are the demo's (:class:`bridge.testbed.stages.
Stages`, cached in ``--run``: the demo's run folder convention, so ``runs/bridge_testbed`` of
``resurgence bridge demo`` is reused as is); MACE, which the demo does not run, is unlearned with
:func:`bridge.unlearning.run.unlearn` and cached in ``RUN/unlearned/mace``.

(a) **Audit**: every world concept other than the erased one is a candidate fine-tuning set
(``images_per_concept`` images, its own caption). :func:`bridge.audit.audit` (Gauss-Newton, top_k
4, exact Krylov run) predicts each candidate's presence after T GD steps on cross-attention at
lr = 1 / max_c lambda_max(c) (one planned lr, stable for every candidate); the same GD is run
(:func:`bridge.finetune.finetune`, full batch, the audit's frozen probes) and presence measured.
Spearman(predicted, measured) over the candidates is the issue's target (>= 0.8).

(b) **Guard**: the demo's fine-tuning set (3 concepts x 8 images). GD: full batch on
cross-attention, ``gd_steps`` steps at lr = 1/lambda_max(GGN at theta_u); AdamW: the demo's
realistic fine-tuning (whole UNet, minibatches). Each plain, with
:func:`bridge.guard.forget_subspace_guard` and with :func:`bridge.guard.retain_core_guard`
(retained: every concept other than the erased one, teacher targets). Reported: presence recovery
(presence after fine-tuning minus after unlearning), its cut against plain, the benign loss
(frozen probes of the fine-tuning set) over plain's, the share of each update removed and the
forget-subspace guard's restoring correction over the projected step (``--no-restore``: none).

Seeds: measured (and the audit's predicted) presence uses the demo's presence seeds
``10000 .. 10000 + seeds - 1``; the guard's presence readout uses other seeds
(``20000 ..``), so the guard is never built on the seeds it is judged on.

    python -m benchmarks.bench_guard_audit --json out.json          # ~2 h on one core
    python -m benchmarks.bench_guard_audit --quick                  # smoke size, ~3 min

Progress goes to stderr; the JSON report is printed at the end (and written to ``--json``, also
after each method, so a killed run keeps what it finished).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bridge.testbed.predict import PRESENCE_SEED_BASE

GROUP = "cross-attn"  # covers UCE's K/V, ESD-x's attn2 and MACE's K/V
EVAL_SEED_BASE = PRESENCE_SEED_BASE  # the demo's presence seeds
GUARD_SEED_BASE = 20_000  # the guard's presence readout: disjoint from the evaluation seeds
METHODS = ("uce", "esd-x", "mace")
QUICK = {
    "pretrain_steps": 60,
    "classifier_steps": 60,
    "esd_steps": 3,
    "images_per_concept": 2,
    "gd_steps": 4,
    "adamw_steps": 4,
    "presence_seeds": 8,
    "sample_steps": 4,
}


def log(msg: str) -> None:
    print(f"[bench_guard_audit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Testbed:
    """The demo's shared objects, plus the benchmark's seeds."""

    cfg: object
    st: object
    base: object
    text: object
    sched: object
    classifier: object
    accuracy: float
    erased: int
    forget: list
    eval_seeds: list[int]
    guard_seeds: list[int]


def _readout_names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated readout option as names, or None (the guard's default) when not given."""
    return None if text is None else tuple(r.strip() for r in text.split(","))


def build_testbed(cfg, run: Path, *, seeds: int, guard_seeds: int,
                  eval_seed_base: int = EVAL_SEED_BASE) -> Testbed:  # fmt: skip
    from bridge.testbed.stages import Stages

    st = Stages(cfg, run, progress=False)
    pipe = st.base()
    clf, acc = st.classifier()
    return Testbed(
        cfg, st, pipe.unet.eval(), pipe.text_encoder, pipe.scheduler, clf, acc,
        st.world.concept_id(cfg.erase), st.forget_batches(pipe.text_encoder, pipe.scheduler),
        list(range(eval_seed_base, eval_seed_base + seeds)),
        list(range(GUARD_SEED_BASE, GUARD_SEED_BASE + guard_seeds)),
    )  # fmt: skip


def unlearned(tb: Testbed, method: str):
    """The demo's unlearned UNet (UCE, ESD-x), or MACE unlearned once and cached beside them."""
    if method != "mace":
        return tb.st.unlearned(method, tb.base, tb.text, tb.sched).eval()
    from bridge.unlearn_io import load_unlearned, save_unlearned
    from bridge.unlearning.run import unlearn

    folder = tb.st.run / "unlearned" / "mace"
    if not (folder / "manifest.json").is_file():
        log(f"unlearning {tb.cfg.erase!r} with mace")
        out = unlearn("mace", tb.base, tb.text, tb.sched, [tb.cfg.erase], seed=tb.cfg.seed,
                      progress=False)  # fmt: skip
        save_unlearned(out.unet, folder, method="mace", args=out.args, seed=out.seed,
                       base_unet=tb.base, base_folder=tb.st.run / "base")  # fmt: skip
    return load_unlearned(tb.base, folder).eval()


def presence(tb: Testbed, unet, seeds=None) -> dict:
    """Measured presence of the erased concept under its prompt: mean and standard error."""
    from bridge.generate import generate
    from bridge.presence import classifier_presence

    seeds = tb.eval_seeds if seeds is None else seeds
    images = generate(unet, tb.text.encode_prompts, [tb.cfg.erase], scheduler=tb.sched,
                      seeds=seeds, steps=tb.cfg.sample_steps,
                      guidance_scale=tb.cfg.guidance_scale)[0]  # fmt: skip
    p = classifier_presence(images, tb.classifier.probabilities, tb.erased).double().numpy()
    return {"mean": float(p.mean()), "sem": float(p.std(ddof=1) / np.sqrt(len(p)))}


def sampler(tb: Testbed, seeds):
    from bridge.probes import sampler_probe

    return sampler_probe(tb.text, tb.cfg.erase, scheduler=tb.sched, seeds=seeds,
                         steps=tb.cfg.sample_steps, guidance_scale=tb.cfg.guidance_scale)  # fmt: skip


def probes_of(tb: Testbed, captions, images, **kw):
    from bridge.probes import finetune_probes

    return finetune_probes(tb.text, list(captions), images, alphas_cumprod=tb.sched.alphas_cumprod,
                           batch_size=tb.cfg.probe_batch, seed=tb.cfg.seed, **kw)  # fmt: skip


def lambda_max(unet, batches, seed: int) -> float:
    """Largest Gauss-Newton eigenvalue of the frozen loss over GROUP at ``unet``."""
    from bridge.ggn import GGNOperator
    from bridge.groups import select_group
    from bridge.loss import FrozenDiffusionLoss
    from bridge.spectra import top_eigenpairs

    op = GGNOperator(FrozenDiffusionLoss(unet, select_group(unet, GROUP), batches))
    return float(top_eigenpairs(op, 1, tol=1e-3, seed=seed).eigenvalues[0])


def gd_config(cfg, lr: float, steps: int, method: str):
    from bridge.finetune import FinetuneConfig
    from bridge.hygiene import method_group

    return FinetuneConfig(steps=steps, lr=lr, optimizer="sgd", trainable=GROUP, full_batch=True,
                          measured_group=method_group(method), track_every=max(steps, 1),
                          checkpoint_every=max(steps, 1), seed=cfg.seed)  # fmt: skip


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ---- (a) the audit --------------------------------------------------------------------------
def audit_part(tb: Testbed, method: str, unet, *, top_k: int) -> dict:
    from bridge.audit import Candidate, audit
    from bridge.finetune import FinetuneData, finetune
    from bridge.testbed.predict import classifier_log_probs

    cfg, world = tb.cfg, tb.st.world
    names = [c for c in world.captions if c != cfg.erase]
    gen = torch.Generator().manual_seed(cfg.seed + 404)
    cands = []
    for name in names:
        ids = torch.full((cfg.images_per_concept,), world.concept_id(name))
        cands.append((name, probes_of(tb, [name] * len(ids), world.sample(ids, gen))))
    t0 = time.time()
    lams = {n: lambda_max(unet, b, cfg.seed) for n, b in cands}
    lr = 1.0 / max(lams.values())
    steps = [cfg.gd_steps // 2, cfg.gd_steps]
    log(f"{method}: audit of {len(cands)} candidates at lr = {lr:.4g}, T = {steps}")
    report = audit(
        tb.base, unet, tb.text, tb.sched, [Candidate(n, probes=tuple(b)) for n, b in cands],
        forget_batches=tb.forget, lrs=[lr], steps=steps, group=GROUP,
        sampler=sampler(tb, tb.eval_seeds), log_probs=classifier_log_probs(tb.classifier),
        concept=tb.erased, curvature="ggn", top_k=top_k, seed=cfg.seed,
    )  # fmt: skip
    audit_s = time.time() - t0
    at_u = presence(tb, unet)
    rows = []
    t0 = time.time()
    for name, batches in cands:
        log(f"{method}: measured GD on candidate {name!r}")
        res = finetune(unet, FinetuneData(probe_batches=batches),
                       gd_config(cfg, lr, cfg.gd_steps, method), scheduler=tb.sched,
                       progress=False)  # fmt: skip
        c = report.get(name)
        measured = presence(tb, res.unet)
        rows.append({
            "candidate": name,
            "lambda_max": lams[name],
            "predicted_presence": c.score,
            "predicted_output_rho": float(c.prediction.get("output_rho")[0, -1]),
            "measured_presence": measured["mean"],
            "measured_presence_sem": measured["sem"],
            "measured_recovery": measured["mean"] - at_u["mean"],
            "audit_products": int(sum(c.hvps.values())),
            "audit_seconds": round(c.seconds, 2),
        })  # fmt: skip
    pred = [r["predicted_presence"] for r in rows]
    meas = [r["measured_presence"] for r in rows]
    return {
        "lr": lr,
        "steps": steps,
        "presence_unlearned": at_u,
        "spearman_presence": spearman(pred, meas),
        "spearman_output_rho": spearman([r["predicted_output_rho"] for r in rows], meas),
        "ranking_audit": list(report.ranking),
        "ranking_measured": [
            r["candidate"] for r in sorted(rows, key=lambda r: -r["measured_presence"])
        ],  # fmt: skip
        "candidates": rows,
        "audit_s": round(audit_s, 1),
        "measured_s": round(time.time() - t0, 1),
    }


# ---- (b) the guard --------------------------------------------------------------------------
def guard_runs(tb: Testbed, method: str, unet, *, optimizers, refresh: dict, guards,
               readouts=None, restore: bool = True, restore_readouts=None) -> dict:  # fmt: skip
    from bridge.finetune import FinetuneData, finetune, forget_loss
    from bridge.guard import forget_subspace_guard, retain_core_guard
    from bridge.probes import Probes, finetune_probes
    from bridge.testbed.predict import classifier_log_probs
    from bridge.testbed.stages import adamw_config

    cfg = tb.cfg
    images, captions = tb.st.finetune_set(tb.text)
    train = probes_of(tb, captions, images)  # GD's frozen loss (the demo's quadrature)
    held = probes_of(tb, captions, images, draws=4)  # AdamW's benign loss: more draws
    embeds, null = tb.text.encode_prompts(captions), tb.text.encode_prompts([""])
    retained = [c for c in tb.st.world.captions if c != cfg.erase]
    retain = finetune_probes(tb.text, retained * 4, alphas_cumprod=tb.sched.alphas_cumprod,
                             batch_size=1, seed=cfg.seed, teacher=tb.base)  # fmt: skip
    guard_probes = Probes(finetune=[], forget=list(tb.forget),
                          sampler=sampler(tb, tb.guard_seeds), seed=cfg.seed)  # fmt: skip
    at_u = presence(tb, unet)
    out = {"presence_unlearned": at_u, "retained": retained}
    for opt in optimizers:
        if opt == "gd":
            lr = 1.0 / lambda_max(unet, train, cfg.seed)
            ft = gd_config(cfg, lr, cfg.gd_steps, method)
            data, bench = FinetuneData(probe_batches=train), train  # benign loss: GD's objective
        else:
            ft = dataclasses.replace(adamw_config(cfg, method), track_every=cfg.adamw_steps,
                                     checkpoint_every=cfg.adamw_steps)  # fmt: skip
            data, bench = FinetuneData(images, embeds, null), held
        rows = {
            "lr": ft.lr,
            "steps": ft.steps,
            "trainable": ft.trainable,
            "refresh_every": refresh[opt],
            "benign_loss_unlearned": forget_loss(unet, bench),
        }
        for kind in ("none", *guards):
            if kind == "forget-subspace":
                guard = forget_subspace_guard(
                    tb.base, guard_probes, log_probs=classifier_log_probs(tb.classifier),
                    concept=tb.erased, refresh_every=refresh[opt], readouts=readouts,
                    restore=restore, restore_readouts=restore_readouts)  # fmt: skip
            elif kind == "retain-core":
                guard = retain_core_guard(retain, refresh_every=refresh[opt])
            else:
                guard = None
            log(f"{method}: {opt} fine-tuning, guard {kind}")
            t0 = time.time()
            res = finetune(unet, data, ft, scheduler=tb.sched, guard=guard, progress=False)
            p = presence(tb, res.unet)
            rows[kind] = {
                "presence": p,
                "recovery": p["mean"] - at_u["mean"],
                "benign_loss": forget_loss(res.unet, bench),
                "removed_share": float(np.mean(res.guard_removed)) if guard else 0.0,
                "guard_rank": int(guard.basis.shape[1]) if guard else 0,
                "restore": bool(guard.restore) if guard else False,
                "guard_label": guard.label if guard else "",
                "correction_share": (float(np.mean(guard.corrections))
                                     if guard and guard.corrections else 0.0),  # fmt: skip
                "seconds": round(time.time() - t0, 1),
            }
        plain = rows["none"]
        for kind in guards:
            r = rows[kind]
            r["recovery_cut"] = (1.0 - r["recovery"] / plain["recovery"]
                                 if plain["recovery"] > 0 else None)  # fmt: skip
            r["benign_loss_ratio"] = r["benign_loss"] / plain["benign_loss"]
        out[opt] = rows
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/bridge_testbed", help="demo run folder (cache)")
    parser.add_argument("--config", default="experiments/configs/bridge_testbed.toml")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--parts", default="audit,guard", help="audit, guard or both")
    parser.add_argument("--optimizers", default="gd,adamw", help="gd, adamw or both")
    parser.add_argument("--guards", default="forget-subspace,retain-core")
    parser.add_argument(
        "--seeds",
        type=int,
        default=512,
        help="presence seeds (measured; on 128 a guarded recovery varies +-0.02 between seed sets)",
    )
    parser.add_argument(
        "--guard-seeds",
        type=int,
        default=256,
        help="guard's presence seeds (fewer leak: held on its seeds, presence rises on others)",
    )
    parser.add_argument(
        "--guard-readouts",
        default=None,
        help="forget-subspace readouts, comma-separated (default: the guard's)",
    )
    parser.add_argument(
        "--eval-seed-base",
        type=int,
        default=EVAL_SEED_BASE,
        help="first measured-presence seed (another base: a development check)",
    )
    parser.add_argument(
        "--no-restore",
        action="store_true",
        help="forget-subspace guard: projection only (no return of the readouts to theta_u)",
    )
    parser.add_argument(
        "--restore-readouts",
        default=None,
        help="forget-subspace readouts the restoring correction returns to theta_u, "
        "comma-separated (default: the guard's, presence with a classifier)",
    )
    parser.add_argument("--refresh-gd", type=int, default=1, help="guard refresh, GD")
    parser.add_argument("--refresh-adamw", type=int, default=20, help="guard refresh, AdamW")
    parser.add_argument("--top-k", type=int, default=4, help="audit eigenpairs per candidate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke size (RUN-quick folder)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)

    from bridge.testbed.demo import load_demo_config

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = [f"{k}={v}" for k, v in QUICK.items()] if args.quick else []
    cfg = load_demo_config(args.config, overrides)
    run = Path(args.run + ("-quick" if args.quick else ""))
    saved = run / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != cfg.to_dict():
        raise SystemExit(f"{run} holds a demo run of another config ({saved}); give another --run.")
    seeds = min(args.seeds, cfg.presence_seeds) if args.quick else args.seeds
    guard_seeds = min(args.guard_seeds, 4) if args.quick else args.guard_seeds
    tb = build_testbed(cfg, run, seeds=seeds, guard_seeds=guard_seeds,
                       eval_seed_base=args.eval_seed_base)  # fmt: skip
    guard_readouts = _readout_names(args.guard_readouts)
    restore_readouts = _readout_names(args.restore_readouts)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    parts = {p.strip() for p in args.parts.split(",")}
    report = {
        "config": args.config,
        "quick": args.quick,
        "run": str(run),
        "classifier_heldout_accuracy": tb.accuracy,
        "presence_seeds": [tb.eval_seeds[0], tb.eval_seeds[-1]],
        "guard_presence_seeds": [tb.guard_seeds[0], tb.guard_seeds[-1]],
        "guard_readouts": guard_readouts,
        "guard_restore": not args.no_restore,
        "guard_restore_readouts": restore_readouts,
        "sample_steps": cfg.sample_steps,
        "guidance_scale": cfg.guidance_scale,
        "methods": {},
    }

    def dump() -> None:
        report["wall_s"] = round(time.time() - t_start, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")

    report["presence_base"] = presence(tb, tb.base)
    for method in methods:
        unet = unlearned(tb, method)
        rec: dict = {}
        report["methods"][method] = rec
        t0 = time.time()
        if "audit" in parts:
            rec["audit"] = audit_part(tb, method, unet, top_k=args.top_k)
            log(f"{method}: audit Spearman {rec['audit']['spearman_presence']:.3f}")
            dump()
        if "guard" in parts:
            rec["guard"] = guard_runs(
                tb, method, copy.deepcopy(unet),
                optimizers=[o.strip() for o in args.optimizers.split(",") if o.strip()],
                refresh={"gd": args.refresh_gd, "adamw": args.refresh_adamw},
                guards=[g.strip() for g in args.guards.split(",") if g.strip()],
                readouts=guard_readouts,
                restore=not args.no_restore,
                restore_readouts=restore_readouts,
            )  # fmt: skip
        rec["seconds"] = round(time.time() - t0, 1)
        dump()
    dump()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
