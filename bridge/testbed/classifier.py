"""A small CNN concept classifier for the testbed world: the analogue of the paper's detectors.

It is trained on the world's own images (with extra pixel noise, so that imperfect generated
samples are still judged by their colour and shape) and serves as the presence hook
(:func:`bridge.presence.classifier_presence`): a callable ``images -> probabilities``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bridge.testbed.world import ConceptWorld

__all__ = ["ConceptClassifier", "ClassifierReport", "train_classifier"]


class ConceptClassifier(nn.Module):
    """CNN ``(n, 3, s, s)`` images in ``[-1, 1]`` -> ``(n, K)`` logits over the world's concepts."""

    def __init__(self, num_concepts: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_concepts),
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ConceptClassifier:
        """The classifier a saved ``state_dict`` came from: concepts and width read off its layers."""
        head = [v for v in state.values() if v.ndim == 2][-1]  # the only Linear: the last layer
        model = cls(head.shape[0], width=state["net.0.weight"].shape[0])
        model.load_state_dict(state)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities, shape ``(n, K)``; the presence hook's contract."""
        self.eval()
        return torch.softmax(self(images.float().clamp(-1, 1)), dim=-1)


class ClassifierReport(NamedTuple):
    """A trained classifier with its held-out accuracy (fraction in [0, 1])."""

    model: ConceptClassifier
    heldout_accuracy: float
    train_steps: int


def train_classifier(
    world: ConceptWorld,
    *,
    steps: int = 300,
    batch_size: int = 64,
    noise: float = 0.6,
    lr: float = 3e-3,
    heldout: int = 512,
    seed: int = 0,
) -> ClassifierReport:
    """Train :class:`ConceptClassifier` on fresh world samples; report held-out accuracy.

    Args:
      world: the concept world.
      steps: Adam steps; batch_size: images per step.
      noise: standard deviation of the Gaussian pixel noise added during training (pixels in
        [-1, 1]).
      lr: Adam learning rate.
      heldout: number of held-out images (new draws from a separate generator, clean).
      seed: seed of the training and held-out generators.

    Returns:
      :class:`ClassifierReport`.
    """
    torch.manual_seed(seed)
    model = ConceptClassifier(len(world.concepts))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    k = len(world.concepts)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, k, (batch_size,), generator=gen)
        x = world.sample(ids, gen)
        scale = noise * torch.rand(batch_size, 1, 1, 1, generator=gen)
        x = x + scale * torch.randn(x.shape, generator=gen)
        loss = nn.functional.cross_entropy(model(x), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_gen = torch.Generator().manual_seed(seed + 10_000)
    ids = torch.arange(heldout) % k
    x = world.sample(ids, held_gen)
    acc = (model.probabilities(x).argmax(-1) == ids).float().mean().item()
    return ClassifierReport(model, acc, steps)
