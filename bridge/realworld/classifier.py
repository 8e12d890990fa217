"""Presence and style classifiers for the real-image world: small CNNs trained on the renders.

The presence classifier predicts the concept (whatever the style), the style classifier the
drawing style (whatever the concept): the analogues of the paper's object detector and style
classifier. Both train on a pool of renders drawn from one seed and are scored on renders from
another seed (held-out augmentations: new scales, angles, colours, backgrounds). Gaussian pixel
noise during training makes them judge imperfect generated samples by shape and colour.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from bridge.realworld.world import RealWorld
from bridge.testbed.classifier import ConceptClassifier

__all__ = ["TARGETS", "ClassifierReport", "labels_of", "render_pool", "train_classifier"]

#: What a classifier predicts: the concept index, or the style index.
TARGETS: tuple[str, ...] = ("concept", "style")


class ClassifierReport(NamedTuple):
    """A trained classifier and how well it does on held-out renders.

    Attributes:
      model: the CNN (eval mode); ``model.probabilities(images)`` is the presence hook.
      target: ``"concept"`` or ``"style"``. classes: class names, in logit order.
      heldout_accuracy: fraction in [0, 1] on ``heldout`` renders of a held-out seed.
      per_class_accuracy: ``{class: accuracy}`` on the same renders.
      train_steps: optimizer steps. step_seconds: mean wall time of one step (render excluded).
    """

    model: ConceptClassifier
    target: str
    classes: tuple[str, ...]
    heldout_accuracy: float
    per_class_accuracy: dict[str, float]
    train_steps: int
    step_seconds: float


def labels_of(world: RealWorld, pair_ids: torch.Tensor, target: str) -> torch.Tensor:
    """Class index of each pair for ``target`` (``"concept"`` or ``"style"``).

    Raises:
      ValueError: for an unknown ``target``.
    """
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {', '.join(TARGETS)}, got {target!r}.")
    column = 0 if target == "concept" else 1
    table = [p[0] if column == 0 else world.styles.index(p[1]) for p in world.pairs]
    return torch.tensor(table)[pair_ids]


def render_pool(world: RealWorld, per_pair: int, seed: int):
    """``per_pair`` renders of every pair, from ``torch.Generator().manual_seed(seed)``.

    Returns:
      ``(images, pair_ids)``: ``(P * per_pair, 3, s, s)`` and ``(P * per_pair,)``.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(len(world.pairs)).repeat(per_pair)
    chunks = [world.sample(ids[i : i + 512], gen) for i in range(0, len(ids), 512)]
    return torch.cat(chunks), ids


def train_classifier(
    world: RealWorld,
    *,
    target: str = "concept",
    steps: int = 600,
    batch_size: int = 64,
    per_pair: int = 32,
    heldout_per_pair: int = 8,
    width: int = 32,
    lr: float = 3e-3,
    noise: float = 0.3,
    seed: int = 0,
    heldout_seed: int = 1_000_003,
    progress: bool = False,
) -> ClassifierReport:
    """Train a :class:`~bridge.testbed.classifier.ConceptClassifier` on renders of ``world``.

    Args:
      world: the concept world. target: ``"concept"`` (presence) or ``"style"``.
      steps: Adam steps (cosine-decayed lr); batch_size: images a step, drawn from the pool.
      per_pair: training renders per (concept, style) pair (the pool, drawn once).
      heldout_per_pair: held-out renders per pair, drawn from ``heldout_seed``.
      width: CNN width. lr: peak learning rate. noise: largest std of the added pixel noise.
      seed: seed of the pool, the initial weights and the minibatches.
      heldout_seed: seed of the held-out renders (must differ from ``seed``).
      progress: show a progress bar.

    Returns:
      :class:`ClassifierReport`.

    Raises:
      ValueError: for an unknown ``target``, ``heldout_seed == seed`` or non-positive sizes.
    """
    from tqdm.auto import tqdm

    if heldout_seed == seed:
        raise ValueError(f"`heldout_seed` must differ from `seed` ({seed}): held-out means unseen.")
    if min(steps, batch_size, per_pair, heldout_per_pair, width) < 1:
        raise ValueError(
            "`steps`, `batch_size`, `per_pair`, `heldout_per_pair`, `width` must be >= 1."
        )
    labels = labels_of(world, torch.arange(len(world.pairs)), target)
    classes = tuple(world.concepts) if target == "concept" else tuple(world.styles)
    images, ids = render_pool(world, per_pair, seed)
    y = labels[ids]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConceptClassifier(len(classes), width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"{target} classifier", disable=not progress):
        pick = torch.randint(0, len(y), (batch_size,), generator=gen)
        x = images[pick]
        sigma = noise * torch.rand(batch_size, 1, 1, 1, generator=gen)
        x = x + sigma * torch.randn(x.shape, generator=gen)
        loss = nn.functional.cross_entropy(model(x), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    step_seconds = (time.perf_counter() - t0) / steps
    model.eval()
    held, held_ids = render_pool(world, heldout_per_pair, heldout_seed)
    truth = labels[held_ids]
    pred = torch.cat(
        [model.probabilities(held[i : i + 512]).argmax(-1) for i in range(0, len(held), 512)]
    )
    right = (pred == truth).float()
    per_class = {c: right[truth == k].mean().item() for k, c in enumerate(classes)}
    return ClassifierReport(
        model, target, classes, right.mean().item(), per_class, steps, step_seconds
    )
