"""Presence of a task's erased concept under its three prompt groups, from DDIM samples.

The evaluation of the authors' protocol on the real-image testbed: images are sampled with a
deterministic DDIM sampler from fixed seeds (the same seeds for the base, unlearned and every
fine-tuned model), and scored by the testbed's presence classifier (concept tasks) or style
classifier (the style task). Two numbers per group:

* ``presence``: the mean classifier probability of the erased concept (or style);
* ``top1``: the fraction of images whose most probable class is the erased concept.

For the ``others`` group (prompts naming other concepts) ``presence`` is *incidental* presence
of the erased concept, and ``own`` is the mean probability of each prompt's own concept (how
much the model still draws what it is asked for).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from bridge.generate import ddim_sample
from bridge.realworld.concepts import STYLE_PHRASES
from bridge.realworld.protocol import PromptGroups, Task

__all__ = ["GroupScorer", "SamplerSettings", "task_target"]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How evaluation images are drawn: seeds per prompt, prompts per group, DDIM settings.

    Attributes:
      seeds: images per prompt (the protocol's evaluation seeds, the same for every model).
      prompts_per_group: keep at most this many prompts of each group (first ones; the erased
        group's prompts are its templates, the synonyms' are paraphrases x templates).
      steps: DDIM steps. guidance_scale: classifier-free guidance scale.
    """

    seeds: int = 8
    prompts_per_group: int = 4
    steps: int = 20
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        for name in ("seeds", "prompts_per_group", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")


def task_target(task: Task, concepts: Sequence[str], styles: Sequence[str]) -> tuple[str, int]:
    """Which classifier scores ``task`` and the class index of its erased concept.

    Returns:
      ``("style", index of the style)`` for the style task, else ``("concept", index)``.

    Raises:
      ValueError: the task's concept or style is not in the world.
    """
    if task.kind == "style":
        style = next((k for k, v in STYLE_PHRASES.items() if v == task.phrase), None)
        if style not in styles:
            raise ValueError(f"style task {task.name!r} needs style {style!r}; world has {styles}.")
        return "style", list(styles).index(style)
    if task.phrase not in concepts:
        raise ValueError(f"task {task.name!r}: concept {task.phrase!r} is not in the world.")
    return "concept", list(concepts).index(task.phrase)


def _pick(prompts: Sequence[str], n: int, *, spread: bool) -> list[str]:
    """At most ``n`` prompts; ``spread`` takes them evenly (one per paraphrase, not one's templates)."""
    prompts = list(prompts)
    if len(prompts) <= n:
        return prompts
    if not spread:
        return prompts[:n]
    stride = len(prompts) / n
    return [prompts[int(i * stride)] for i in range(n)]


class GroupScorer:
    """Score a UNet on a task's prompt groups (callable: ``unet -> {"<group>/<metric>": v}``).

    The prompts, their embeddings and the seeds are fixed at construction, so every model is
    scored on the same starting noise: differences between models are the models' own.
    """

    def __init__(
        self,
        model,
        task: Task,
        groups: PromptGroups,
        seeds: Sequence[int],
        settings: SamplerSettings = SamplerSettings(),
        *,
        keep_images: int = 0,
    ) -> None:
        """Args:
        model: a :class:`~bridge.realworld.bundle.RealWorldModel` (text, classifiers, world).
        task, groups: the task and its three prompt groups (:meth:`Protocol.prompt_groups`).
        seeds: evaluation seeds, at least ``settings.seeds`` (the first are used).
        keep_images: also keep this many erased-prompt images of the last call in
          :attr:`last_images` (for figure grids).
        """
        if len(seeds) < settings.seeds:
            raise ValueError(f"{len(seeds)} seeds given; `settings.seeds` is {settings.seeds}.")
        self.settings, self.keep_images = settings, keep_images
        self.target, self.index = task_target(task, model.world.concepts, model.world.styles)
        self.classifier = model.style if self.target == "style" else model.presence
        self.prompts: dict[str, list[str]] = {
            "erased": _pick(groups.erased, settings.prompts_per_group, spread=False),
            "synonyms": _pick(groups.synonyms, settings.prompts_per_group, spread=True),
            "others": _pick(groups.others, settings.prompts_per_group, spread=True),
        }
        self.own = [self._own_class(model, task, p) for p in self.prompts["others"]]
        flat = [p for g in self.prompts.values() for p in g]
        with torch.no_grad():
            embeds = model.text.encode_prompts(flat + [""])
        n = settings.seeds
        self._cond = embeds[:-1].repeat_interleave(n, dim=0)
        self._uncond = embeds[-1:]
        self._seeds = [int(s) for _ in flat for s in list(seeds)[:n]]
        self._scheduler = model.scheduler
        self.last_images: torch.Tensor | None = None

    @staticmethod
    def _own_class(model, task: Task, prompt: str) -> int | None:
        if task.kind == "style":
            return None  # "others" of the style task are Noto drawings: own = Noto style
        for name, prompts in task.candidates.items():
            if prompt in prompts:
                return list(model.world.concepts).index(name)
        return None

    def images(self, unet) -> torch.Tensor:
        """All evaluation images of ``unet``, group by group, prompt by prompt, seed by seed."""
        s = self.settings
        return ddim_sample(
            unet,
            self._cond,
            self._uncond,
            scheduler=self._scheduler,
            seeds=self._seeds,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
        )

    @torch.no_grad()
    def __call__(self, unet) -> dict[str, float]:
        """``{"erased/presence", "erased/top1", ..., "others/own"}`` of ``unet``."""
        images = self.images(unet)
        probs = self.classifier.probabilities(images)
        n, out, start = self.settings.seeds, {}, 0
        for group, prompts in self.prompts.items():
            block = probs[start : start + n * len(prompts)]
            out[f"{group}/presence"] = float(block[:, self.index].mean())
            out[f"{group}/top1"] = float((block.argmax(-1) == self.index).float().mean())
            if group == "others":
                if self.target == "style":
                    own = 1 - block[:, self.index]  # two styles: the rest is the Noto style
                else:
                    rows = torch.arange(len(block))
                    cls = torch.tensor([c for c in self.own for _ in range(n)])
                    own = block[rows, cls]
                out["others/own"] = float(own.mean())
            if group == "erased" and self.keep_images:
                self.last_images = images[start : start + n * len(prompts)][: self.keep_images]
            start += n * len(prompts)
        return out
