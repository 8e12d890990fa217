"""The resurgence experiment on the real-image testbed, with the paper authors' protocol.

For each task (erased concept) and unlearning method: presence before and after unlearning,
then benign fine-tuning of the unlearned UNet on images SAMPLED FROM THE BASE MODEL for other
concepts, one fine-tuning set per MiniLM-similarity bin, with LoRA and with full fine-tuning,
presence evaluated on the three prompt groups at every checkpoint. Everything lands in the
authors' long-format table (``results.csv``).

Run folder layout (a rerun skips every finished unit, so an interrupted run resumes)::

    out/results.csv                   the long-format table (rewritten after each unit)
    out/progress.json                 finished units
    out/config.json                   the knobs the units were run with (a resume must match)
    out/finetune_sets/<task>/<bin>.pt images sampled from the base model, and their captions
    out/unlearned/<task>/<method>.pt  the unlearned UNet's state (edited tensors only)
    out/samples/<unit>.pt             the first erased-prompt images of each model state
    out/runs/<unit>/history.json      the fine-tuning tracker's history
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bridge.realworld.evaluate import GroupScorer, SamplerSettings
from bridge.realworld.protocol import LORA, FinetuneRecipe, Protocol, Task, default_tasks
from bridge.realworld.table import ResultsTable, checkpoint_type
from theory._atomic import atomic_write, atomic_write_json

__all__ = ["ExperimentConfig", "check_tasks", "load_experiment_config", "run_experiment"]


#: The methods that take anchor prompts and a preserve set (:meth:`ExperimentConfig.targets`).
_TARGETED = ("uce", "uce_v", "mace")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of ``resurgence bridge realworld experiment`` (flat TOML keys).

    Attributes:
      tasks: task names of :func:`~bridge.realworld.protocol.default_tasks` ("ship", "bomb",
        "pistol", "Statue of Liberty", "Santa Claus", "OpenMoji style").
      methods: unlearning methods (any spelling :func:`bridge.unlearning.run.unlearn` accepts).
      uce_lams: UCE ridge strengths; each is one ``config`` (claim (d): regularisation).
      uce_from_token: which tokens UCE edits (:func:`~bridge.unlearning.uce.uce_token_embeddings`):
        ``"first"`` (every word's token) suits MiniLM, a bidirectional encoder in which every
        token carries the whole prompt; ``"last"`` is the UCE code's choice for CLIP's causal one.
      preserve_for: the methods (of those that take a preserve set: UCE, MACE) that keep every
        benign candidate's prompts while erasing (:meth:`~bridge.realworld.protocol.Task.preserved`).
      esd_steps, esd_lr: ESD-x optimisation (the official code's 1e-5 is tuned for SD).
      mace_lr: the learning rate of MACE's LoRA stage (the official 1e-4 is tuned for SD).
      recipes: ``"lora"`` and/or ``"full"`` (the authors' two fine-tuning algorithms).
      finetune_steps, checkpoint_every, batch_size: fine-tuning length, evaluation grid, batch.
      lora_lr, full_lr: peak learning rates (the authors': 1e-4 LoRA cosine, 1e-5 full).
      lora_rank: LoRA rank (4). full_ema: EMA decay of full fine-tuning (0 = no EMA).
      n_bins, max_per_bin, seeds_per_prompt, binning: fine-tuning sets (the authors': 4, 10, 5).
      eval_seeds, eval_prompts, sample_steps, guidance_scale: evaluation sampling.
      seed: the protocol's seed (the authors': 1337). threads: torch CPU threads.
    """

    tasks: tuple[str, ...] = ("ship", "bomb", "Statue of Liberty", "Santa Claus", "OpenMoji style")
    methods: tuple[str, ...] = ("uce", "esd-x", "mace")
    uce_lams: tuple[float, ...] = (0.1,)
    uce_from_token: str = "first"
    preserve_for: tuple[str, ...] = ("uce", "mace")
    esd_steps: int = 200
    esd_lr: float = 1e-5
    mace_lr: float = 1e-4
    recipes: tuple[str, ...] = ("lora", "full")
    finetune_steps: int = 1000
    checkpoint_every: int = 100
    batch_size: int = 8
    lora_lr: float = 1e-4
    full_lr: float = 1e-5
    lora_rank: int = 4
    full_ema: float = 0.0
    n_bins: int = 4
    max_per_bin: int = 10
    seeds_per_prompt: int = 5
    binning: str = "width"
    eval_seeds: int = 8
    eval_prompts: int = 4
    sample_steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 1337
    threads: int = 1

    def __post_init__(self) -> None:
        for key in ("tasks", "methods", "recipes", "uce_lams"):
            if not getattr(self, key):
                raise ValueError(f"`{key}` is empty; give at least one.")
        bad = [r for r in self.recipes if r not in ("lora", "full")]
        if bad:
            raise ValueError(f"`recipes` has {bad[0]!r}; use 'lora' and/or 'full'.")
        if self.uce_from_token not in ("first", "last"):
            raise ValueError(f"`uce_from_token` must be 'first' or 'last', got {self.uce_from_token!r}.")
        bad = [m for m in self.preserve_for if _method(m) not in _TARGETED]
        if bad:
            raise ValueError(f"`preserve_for` has {bad[0]!r}; only UCE and MACE take a preserve set.")
        if any(lam <= 0 for lam in self.uce_lams):
            raise ValueError(f"`uce_lams` must be > 0, got {list(self.uce_lams)}.")
        if not 0 <= self.full_ema < 1:
            raise ValueError(f"`full_ema` must be in [0, 1) (0: no EMA), got {self.full_ema}.")
        self.recipe("lora"), self.recipe("full")  # checks steps / checkpoint grid
        self.protocol(), self.sampler()

    def protocol(self) -> Protocol:
        return Protocol(
            n_bins=self.n_bins,
            seeds_per_prompt=self.seeds_per_prompt,
            max_per_bin=self.max_per_bin,
            recipes=tuple(self.recipe(r) for r in self.recipes),
            seed=self.seed,
            binning=self.binning,
        )

    def recipe(self, algo: str) -> FinetuneRecipe:
        """The authors' recipe ``algo`` with this run's steps, checkpoints and learning rate."""
        if algo == "lora":
            return dataclasses.replace(
                LORA,
                lr=self.lora_lr,
                steps=self.finetune_steps,
                checkpoint_every=self.checkpoint_every,
                lora_rank=self.lora_rank,
            )
        return FinetuneRecipe(
            "full",
            self.full_lr,
            "constant",
            steps=self.finetune_steps,
            checkpoint_every=self.checkpoint_every,
            ema_decay=self.full_ema or None,
        )

    def sampler(self) -> SamplerSettings:
        return SamplerSettings(
            seeds=self.eval_seeds,
            prompts_per_group=self.eval_prompts,
            steps=self.sample_steps,
            guidance_scale=self.guidance_scale,
        )

    def unlearning_configs(self, method: str) -> list[tuple[str, dict]]:
        """``(config label, method options)`` of ``method``: one per UCE lambda, else one."""
        name = _method(method)
        if name in ("uce", "uce_v"):
            return [
                (f"lam={lam:g}", {"lam": float(lam), "from_token": self.uce_from_token})
                for lam in self.uce_lams
            ]
        if name in ("esd_x", "esd_u"):
            return [("default", {"steps": self.esd_steps, "lr": self.esd_lr})]
        if name == "mace":
            return [("default", {"lr": self.mace_lr})]
        return [("default", {})]

    def targets(self, method: str, task: Task) -> dict:
        """The task's anchors and preserve set, for the methods that take them (UCE, MACE)."""
        name = _method(method)
        if name not in _TARGETED:
            return {}
        keep = name in {_method(m) for m in self.preserve_for}
        return {"anchors": list(task.anchors) or None, "preserve": list(task.preserved()) if keep else []}

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _method(name: str) -> str:
    """The canonical name of a method spelling (``"esd-x"`` -> ``"esd_x"``)."""
    from bridge.unlearning.names import resolve_method_name

    return resolve_method_name(name).name


def load_experiment_config(path=None, overrides=()) -> ExperimentConfig:
    """:class:`ExperimentConfig` from a TOML file of flat keys and ``KEY=VALUE`` overrides."""
    from bridge.realworld.config import load_flat_config

    return load_flat_config(ExperimentConfig, path, overrides)


def check_tasks(cfg: ExperimentConfig, world) -> dict[str, Task]:
    """The world's tasks, after checking that every task of ``cfg`` is one of them.

    Raises:
      ValueError: a task the world cannot pose (closest task names suggested, all listed).
    """
    from bridge.realworld.concepts import suggest

    tasks = default_tasks(world.concepts)
    for name in cfg.tasks:
        if name not in tasks:
            raise ValueError(
                f"task {name!r} is not a task of this world{suggest(name, list(tasks))}; "
                f"tasks: {', '.join(tasks)}."
            )
    return tasks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


class _Progress:
    """Finished units and the table, saved together after each unit (resume skips them)."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / "progress.json"
        self.done: set[str] = set()
        self.table = ResultsTable()
        if self.path.is_file() and (out / "results.csv").is_file():
            self.done = set(json.loads(self.path.read_text())["done"])
            self.table = ResultsTable.read_csv(out / "results.csv")

    def finish(self, unit: str, rows: list[dict]) -> None:
        for row in rows:
            self.table.add(**row)
        self.done.add(unit)
        self.table.to_csv(self.out / "results.csv")
        atomic_write_json(self.path, {"done": sorted(self.done)})


#: Knobs that only choose which units run (each unit is keyed by them): a folder may be resumed
#: or extended with other values of these; every other knob changes what a unit computes.
_UNIT_KEYS = ("tasks", "methods", "uce_lams", "recipes", "threads")


def _check_resume(out: Path, cfg: ExperimentConfig) -> None:
    """Record the knobs of a new run folder; refuse to resume one run with other knobs.

    Raises:
      ValueError: naming each knob that differs, with both values; or a folder with finished
        units and no recorded settings.
    """
    path = out / "config.json"
    now = {k: v for k, v in cfg.to_dict().items() if k not in _UNIT_KEYS}
    if not path.is_file():
        if (out / "progress.json").is_file():
            raise ValueError(
                f"{out} holds finished units but no config.json (it was made before run folders "
                "recorded their settings), so a resume cannot be checked; delete it or give "
                "another `--out`."
            )
        atomic_write_json(path, now)
        return
    before = json.loads(path.read_text())
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if diff:
        changes = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"{out} holds units run with other settings ({changes}); give another `--out`, "
            "or the folder's settings (only tasks, methods, uce_lams, recipes, threads may change)."
        )


def _rows(base: dict, scores: dict[str, float], type_: str) -> list[dict]:
    out = []
    for key, value in scores.items():
        group, _, metric = key.partition("/")
        if not metric:
            group, metric = "erased", group  # readouts of the erased concept (rho)
        out.append({**base, "prompts": group, "type": type_, "metric": metric, "value": value})
    return out


def _finetune_set(model, task: Task, bin_, protocol: Protocol, cfg: ExperimentConfig, out: Path):
    """Images sampled from the base model for the bin's concepts (cached on disk)."""
    from bridge.realworld.pipeline import sample_finetune_set

    path = out / "finetune_sets" / _slug(task.name) / f"{bin_.label}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    pairs = protocol.finetune_set(task, bin_)
    images, captions = sample_finetune_set(
        model.unet,
        model.text,
        model.scheduler,
        pairs,
        steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
    )
    data = {"images": images, "captions": captions, "concepts": list(bin_.concepts)}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    return data


def _unlearned(model, task: Task, method: str, label: str, options: dict, cfg, out: Path):
    """The unlearned UNet (its edited tensors cached on disk, so a rerun skips unlearning)."""
    import copy

    from bridge.unlearning.run import unlearn

    path = out / "unlearned" / _slug(task.name) / f"{_slug(method)}_{_slug(label)}.pt"
    if path.is_file():
        unet = copy.deepcopy(model.unet)
        unet.load_state_dict(torch.load(path, weights_only=True), strict=False)
        return unet.eval()
    outcome = unlearn(
        method,
        model.unet,
        model.text,
        model.scheduler,
        list(task.erased),
        seed=cfg.seed,
        progress=False,
        **cfg.targets(method, task),
        **options,
    )
    base = dict(model.unet.named_parameters())
    edited = {
        n: p.detach().clone()
        for n, p in outcome.unet.named_parameters()
        if not torch.equal(p.detach(), base[n].detach())
    }
    atomic_write(path, lambda tmp: torch.save(edited, tmp))
    return outcome.unet.eval()


def _finetune(model, unlearned, method, data, recipe: FinetuneRecipe, scorer, cfg, run_dir):
    """Fine-tune ``unlearned`` on ``data`` with ``recipe``; the tracker scores every checkpoint."""
    from bridge.finetune import FinetuneConfig, FinetuneData, finetune
    from bridge.hygiene import method_group

    captions = list(data["captions"])
    unique = sorted(set(captions))
    with torch.no_grad():
        embeds = model.text.encode_prompts(unique + [""])
    rows = torch.tensor([unique.index(c) for c in captions])
    ft_data = FinetuneData(
        images=data["images"], embeddings=embeds[rows], null_embedding=embeds[-1:]
    )
    extra = {"schedule": recipe.schedule, "grad_clip": recipe.grad_clip}
    if recipe.ema_decay is not None:
        extra["ema_decay"] = recipe.ema_decay
    ft_cfg = FinetuneConfig(
        steps=recipe.steps,
        lr=recipe.lr,
        optimizer="adamw",
        batch_size=cfg.batch_size,
        trainable="lora" if recipe.algo == "lora" else "all",
        lora_rank=recipe.lora_rank or 4,
        measured_group=method_group(method),
        track_every=recipe.checkpoint_every,
        checkpoint_every=recipe.checkpoint_every,
        seed=cfg.seed,
        **extra,
    )
    return finetune(
        unlearned,
        ft_data,
        ft_cfg,
        scheduler=model.scheduler,
        base_unet=model.unet,
        presence=scorer,
        out_dir=run_dir,
        progress=False,
    )


def run_experiment(model, cfg: ExperimentConfig, out_dir, *, progress: bool = True) -> dict:
    """Run (or resume) the whole experiment of ``cfg`` on ``model``; write ``results.csv``.

    Args:
      model: a :class:`~bridge.realworld.bundle.RealWorldModel` (the base, pre-unlearning model).
      cfg: the experiment config. out_dir: the run folder (see the module docstring).
      progress: show a progress bar over units.

    Returns:
      ``{"units", "rows", "wall_time_s", "bins": {task: [{label, concepts, low, high}]}}``.

    Raises:
      ValueError: a task that is not in the model's world (the known task names listed), or a
        folder that holds units run with other settings (each differing knob named).
    """
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    protocol = cfg.protocol()
    tasks = check_tasks(cfg, model.world)
    _check_resume(out, cfg)
    state = _Progress(out)
    seeds = protocol.eval_seeds(cfg.eval_seeds)
    plan = []
    for name in cfg.tasks:
        plan.append((name, "base", None, None))
        for method in cfg.methods:
            for label, options in cfg.unlearning_configs(method):
                plan.append((name, method, label, options))
    bins_report: dict[str, list[dict]] = {}
    bar = tqdm(plan, desc="realworld experiment", disable=not progress)
    for name, method, label, options in bar:
        task = tasks[name]
        groups = protocol.prompt_groups(task)
        bins = protocol.bins(task, model.text.similarity)
        bins_report[name] = [
            {"label": b.label, "concepts": list(b.concepts), "low": b.low, "high": b.high}
            for b in bins
        ]
        scorer = GroupScorer(model, task, groups, seeds, cfg.sampler(), keep_images=8)
        key = dict(task=name, seed=cfg.seed)
        if method == "base":
            unit = f"{_slug(name)}/base"
            if unit not in state.done:
                bar.set_postfix_str(unit)
                scores = scorer(model.unet)
                _save_samples(out, unit, scorer.last_images)
                state.finish(
                    unit,
                    _rows(
                        dict(key, algo="base", config="none", finetune_algo="none",
                             finetune_set="none"),
                        scores,
                        "base",
                    ),
                )
            continue
        unlearned = None
        head = dict(key, algo=method, config=label)
        unit = f"{_slug(name)}/{_slug(method)}_{_slug(label)}/unlearned"
        if unit not in state.done:
            bar.set_postfix_str(unit)
            unlearned = _unlearned(model, task, method, label, options, cfg, out)
            scores = scorer(unlearned)
            _save_samples(out, unit, scorer.last_images)
            state.finish(
                unit,
                _rows(dict(head, finetune_algo="none", finetune_set="none"), scores, "unlearned"),
            )
        for bin_ in bins:
            for algo in cfg.recipes:
                unit = f"{_slug(name)}/{_slug(method)}_{_slug(label)}/{algo}_{bin_.label}"
                if unit in state.done:
                    continue
                bar.set_postfix_str(unit)
                if unlearned is None:
                    unlearned = _unlearned(model, task, method, label, options, cfg, out)
                data = _finetune_set(model, task, bin_, protocol, cfg, out)
                result = _finetune(
                    model, unlearned, method, data, cfg.recipe(algo), scorer, cfg, out / "runs" / unit
                )
                _save_samples(out, unit, scorer.last_images)  # the last checkpoint's images
                rows = []
                for rec in result.history:
                    scores = {
                        k: v for k, v in rec.items() if "/" in k or k == "rho"
                    }
                    rows += _rows(
                        dict(head, finetune_algo=algo, finetune_set=bin_.label),
                        scores,
                        checkpoint_type(int(rec["step"])),
                    )
                state.finish(unit, rows)
    summary = {
        "units": len(state.done),
        "rows": len(state.table),
        "wall_time_s": time.time() - t0,
        "bins": bins_report,
    }
    atomic_write_json(out / "bins.json", bins_report)
    return summary


def _save_samples(out: Path, unit: str, images) -> None:
    if images is None:
        return
    path = out / "samples" / f"{unit.replace('/', '__')}.pt"
    atomic_write(path, lambda tmp: torch.save(images.clone(), tmp))
