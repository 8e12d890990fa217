"""Stages of the testbed demo, each cached on disk (a rerun loads instead of recomputing).

A stage counts as done when its last file exists; every file is written atomically
(:mod:`theory._atomic`) and that marker last, so a killed run never leaves a stage that looks done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bridge.testbed.shipped import SHIPPED, copy_shipped_base, copy_shipped_classifier
from theory._atomic import atomic_directory, atomic_write, atomic_write_json

__all__ = ["Stages", "adamw_config", "adamw_history", "log"]


def log(msg: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _done(path: Path) -> bool:
    return path.is_file()


class Stages:
    """Lazily built shared objects of one run (models, classifier, data)."""

    def __init__(self, cfg, run: Path, progress: bool) -> None:
        self.cfg, self.run, self.progress = cfg, run, progress
        self.world = cfg.world
        self.timings: dict[str, float] = {}

    # ---- stage 1: pretrain -------------------------------------------------------------
    def base(self):
        from bridge.sd import load_pipeline
        from bridge.testbed.train import ModelConfig, pretrain

        folder = self.run / "base"
        if not _done(folder / "done.json") and self.cfg.shipped_weights:
            if copy_shipped_base(self.cfg, folder):
                log(f"loaded the shipped pretrained tiny UNet ({SHIPPED / 'base'})")
                atomic_write_json(folder / "done.json", {"shipped": True})
        if not _done(folder / "done.json"):
            log(f"pretraining the tiny UNet ({self.cfg.pretrain_steps} steps)")
            t0 = time.time()
            mcfg = ModelConfig(
                block_out_channels=tuple(self.cfg.block_out_channels),
                text_dim=self.cfg.text_dim,
                seed=self.cfg.seed,
            )
            pretrain(
                self.world,
                folder,
                cfg=mcfg,
                steps=self.cfg.pretrain_steps,
                batch_size=self.cfg.pretrain_batch,
                lr=self.cfg.pretrain_lr,
                p_null=self.cfg.p_null,
                seed=self.cfg.seed,
                progress=self.progress,
            )
            self.timings["pretrain_s"] = time.time() - t0
            atomic_write_json(folder / "done.json", {"wall_s": self.timings["pretrain_s"]})
        return load_pipeline(folder)

    # ---- stage 2: classifier -----------------------------------------------------------
    def classifier(self):
        from bridge.testbed.classifier import ConceptClassifier, train_classifier

        path, meta = self.run / "classifier.pt", self.run / "classifier.json"
        if not (_done(path) and _done(meta)) and self.cfg.shipped_weights:
            if copy_shipped_classifier(self.cfg, self.run):
                log(f"loaded the shipped concept classifier ({SHIPPED / 'classifier.pt'})")
        if not (_done(path) and _done(meta)):
            log("training the concept classifier")
            t0 = time.time()
            rep = train_classifier(self.world, steps=self.cfg.classifier_steps, seed=self.cfg.seed)
            atomic_write(path, lambda tmp: torch.save(rep.model.state_dict(), tmp))
            self.timings["classifier_s"] = time.time() - t0
            atomic_write_json(
                meta, {"heldout_accuracy": rep.heldout_accuracy, "steps": rep.train_steps}
            )
        model = ConceptClassifier(len(self.world.concepts))
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), json.loads(meta.read_text())["heldout_accuracy"]

    # ---- shared data -------------------------------------------------------------------
    def finetune_set(self, text):
        """Benign fine-tuning images/captions (concepts excluding the erased one), fixed seed."""
        ids = [self.world.concept_id(c) for c in self.cfg.finetune_concepts]
        ids = torch.tensor(ids).repeat_interleave(self.cfg.images_per_concept)
        images = self.world.sample(ids, torch.Generator().manual_seed(self.cfg.seed + 101))
        captions = [self.world.captions[i] for i in ids.tolist()]
        return images, captions

    def forget_batches(self, text, scheduler):
        """Frozen probe batches of the erased concept's images (for forget-loss recovery)."""
        from bridge.loss import make_probe_batches

        n = 2 * self.cfg.images_per_concept
        ids = torch.full((n,), self.world.concept_id(self.cfg.erase))
        images = self.world.sample(ids, torch.Generator().manual_seed(self.cfg.seed + 202))
        cond = text.encode_prompts([self.cfg.erase])
        return make_probe_batches(
            images, cond, scheduler.alphas_cumprod, batch_size=n, seed=self.cfg.seed + 303
        )

    def presence_hook(self, text, scheduler, classifier):
        """unet -> presence of the erased concept under its prompt, and incidental presence."""
        from bridge.generate import generate
        from bridge.presence import classifier_presence
        from bridge.testbed.predict import presence_seeds

        erased = self.world.concept_id(self.cfg.erase)
        prompts = [self.cfg.erase, *self.cfg.finetune_concepts]
        seeds = presence_seeds(self.cfg.presence_seeds)

        def hook(unet) -> dict[str, float]:
            imgs = generate(
                unet,
                text.encode_prompts,
                prompts,
                scheduler=scheduler,
                seeds=seeds,
                steps=self.cfg.sample_steps,
                guidance_scale=self.cfg.guidance_scale,
            )
            p = [
                float(classifier_presence(x, classifier.probabilities, erased).mean()) for x in imgs
            ]
            own = [
                float(
                    classifier_presence(
                        x, classifier.probabilities, self.world.concept_id(c)
                    ).mean()
                )
                for x, c in zip(imgs[1:], prompts[1:], strict=True)
            ]
            return {
                "presence": p[0],
                "incidental_presence": float(np.mean(p[1:])),
                "finetune_concept_presence": float(np.mean(own)),
            }

        return hook

    # ---- stage 3: unlearn --------------------------------------------------------------
    def unlearned(self, method: str, base, text, scheduler):
        from bridge.unlearn import apply_uce, esd, uce_token_embeddings
        from bridge.unlearn_io import load_unlearned, save_unlearned

        folder = self.run / "unlearned" / method
        if not _done(folder / "manifest.json"):
            log(f"unlearning {self.cfg.erase!r} with {method}")
            t0 = time.time()
            if method in ("uce", "uce-v"):
                args = {
                    "erase": [self.cfg.erase],
                    "anchors": [""],
                    "preserve": list(self.cfg.uce_preserve),
                    "edit": "kv" if method == "uce" else "v",
                    "lam": self.cfg.uce_lam,
                    "from_token": self.cfg.uce_from_token,
                }
                concepts = uce_token_embeddings(
                    text,
                    args["erase"],
                    args["anchors"],
                    args["preserve"],
                    from_token=args["from_token"],
                )
                unet = apply_uce(base, concepts, edit=args["edit"], lam=args["lam"])
                seed = None
            else:
                args = {
                    "concepts": [self.cfg.erase],
                    "variant": method[-1],
                    "steps": self.cfg.esd_steps,
                    "lr": self.cfg.esd_lr,
                    "guidance": self.cfg.esd_guidance,
                }
                unet = esd(
                    base,
                    text,
                    scheduler,
                    args["concepts"],
                    variant=args["variant"],
                    steps=args["steps"],
                    lr=args["lr"],
                    guidance=args["guidance"],
                    seed=self.cfg.seed,
                    progress=self.progress,
                )
                seed = self.cfg.seed
            save_unlearned(
                unet,
                folder,
                method=method,
                args=args,
                seed=seed,
                base_unet=base,
                base_folder=self.run / "base",
            )
            self.timings[f"unlearn_{method}_s"] = time.time() - t0
        return load_unlearned(base, folder)


def adamw_config(cfg, method: str):
    """The realistic fine-tuning of the demo: AdamW on the whole UNet, rho tracked over the
    group ``method`` edits (:func:`bridge.hygiene.method_group`: ESD-u edits no cross-attention
    K/V, so a K/V measured group would have delta = 0 there)."""
    from bridge.finetune import FinetuneConfig
    from bridge.hygiene import method_group

    return FinetuneConfig(
        steps=cfg.adamw_steps,
        lr=cfg.adamw_lr,
        optimizer="adamw",
        batch_size=cfg.adamw_batch,
        trainable="all",
        measured_group=method_group(method),
        track_every=cfg.track_every,
        checkpoint_every=cfg.track_every,
        p_null=cfg.p_null,
        seed=cfg.seed,
    )


def adamw_history(
    st: Stages, method, base, unet, images, embeds, null, forget, scheduler, presence
):
    from bridge.finetune import FinetuneData, finetune

    ft = adamw_config(st.cfg, method)
    # The config's digest names the folder: a run of another config (e.g. group) is never reused.
    folder = st.run / "adamw" / f"{method}-{ft.digest()[:8]}"
    if _done(folder / "history.json") and (folder / "unet").is_dir():  # unet/: written last
        return json.loads((folder / "history.json").read_text())
    log(f"AdamW fine-tuning of the whole UNet ({method})")
    t0 = time.time()
    res = finetune(
        unet,
        FinetuneData(images, embeds, null),
        ft,
        scheduler=scheduler,
        base_unet=base,
        forget_batches=forget,
        presence=presence,
        out_dir=folder,
        progress=st.progress,
    )
    with atomic_directory(folder / "unet") as tmp:
        res.unet.save_pretrained(tmp)
    st.timings[f"adamw_{method}_s"] = time.time() - t0
    return res.history
