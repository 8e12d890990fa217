"""A synthetic concept world: coloured shapes on a dark background, with captions.

Each concept is a (colour, shape) pair captioned ``"a {colour} {shape}"`` (e.g. ``"a red circle"``).
Images are ``(3, size, size)`` float32 tensors in ``[-1, 1]`` (pixel-space diffusion, no VAE):
the shape's position, radius and colour are jittered so every concept is a distribution, not one
image. Captions of different concepts share words ("a", the colour or the shape), which is what
makes their text embeddings overlap (theory.md section 1, common component).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "ConceptWorld", "Concept"]

# RGB in [0, 1]; chosen far apart so a tiny CNN separates them under jitter.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Background RGB in [0, 1].
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (0.9, 0.9, 0.9),
}


@dataclasses.dataclass(frozen=True)
class Concept:
    """One concept of the world: a colour, a shape, and its caption."""

    colour: str
    shape: str
    background: str | None = None

    @property
    def caption(self) -> str:
        tail = f" on {self.background}" if self.background is not None else ""
        return f"a {self.colour} {self.shape}{tail}"


@dataclasses.dataclass(frozen=True)
class ConceptWorld:
    """The generator of the testbed: ``sample(concept_ids, generator)`` draws images.

    Args:
      colours: colour names (keys of :data:`COLOURS`).
      shapes: shape names (subset of :data:`SHAPES`).
      backgrounds: background names (keys of :data:`BACKGROUNDS`); with more than one, captions
        read ``"a red circle on white"``.
      size: image side in pixels.
      jitter: maximal shift of the shape's centre, in pixels.
    """

    colours: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle",)
    backgrounds: tuple[str, ...] = ("black", "white")
    size: int = 8
    jitter: int = 1

    def __post_init__(self) -> None:
        bad = [c for c in self.colours if c not in COLOURS]
        if bad:
            raise ValueError(f"`colours` has unknown names {bad}; allowed: {sorted(COLOURS)}.")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"`shapes` has unknown names {bad}; allowed: {list(SHAPES)}.")
        bad = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if bad or not self.backgrounds:
            raise ValueError(
                f"`backgrounds` has unknown names {bad}; allowed: {sorted(BACKGROUNDS)}."
            )
        if self.size < 8:
            raise ValueError(f"`size` must be >= 8 pixels, got {self.size}.")

    @property
    def concepts(self) -> tuple[Concept, ...]:
        if len(self.backgrounds) == 1:
            return tuple(Concept(c, s) for c in self.colours for s in self.shapes)
        return tuple(
            Concept(c, s, b) for b in self.backgrounds for c in self.colours for s in self.shapes
        )

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(c.caption for c in self.concepts)

    def concept_id(self, caption: str) -> int:
        """Index of the concept whose caption is ``caption``."""
        try:
            return self.captions.index(caption)
        except ValueError:
            raise ValueError(
                f"`caption` {caption!r} is not a concept of this world; "
                f"known: {list(self.captions)}."
            ) from None

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word a caption can use."""
        return ("a", "on", *self.colours, *self.shapes, *self.backgrounds)

    def sample(self, concept_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw one image per entry of ``concept_ids``.

        Args:
          concept_ids: integer tensor, shape ``(n,)``.
          generator: a CPU ``torch.Generator`` (the draw is a pure function of its state).

        Returns:
          Images, shape ``(n, 3, size, size)``, float32 in ``[-1, 1]``.
        """
        concept_ids = torch.as_tensor(concept_ids, dtype=torch.long)
        n, s = concept_ids.shape[0], self.size
        concepts = self.concepts
        centre = (s - 1) / 2 + torch.randint(
            -self.jitter, self.jitter + 1, (n, 2), generator=generator
        )
        radius = s * (0.22 + 0.08 * torch.rand(n, generator=generator))
        brightness = 0.85 + 0.15 * torch.rand(n, generator=generator)
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        dy = yy[None].float() - centre[:, 0, None, None]
        dx = xx[None].float() - centre[:, 1, None, None]
        r = radius[:, None, None]
        masks = {
            "circle": dx**2 + dy**2 <= r**2,
            "square": (dx.abs() <= 1.15 * r) & (dy.abs() <= 1.15 * r),
            # upward triangle: below the apex, inside two slanted edges
            "triangle": (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= 0.55 * (dy + r)),
        }
        images = torch.empty((n, 3, s, s))
        for i, cid in enumerate(concept_ids.tolist()):
            concept = concepts[cid]
            bg = BACKGROUNDS[concept.background or self.backgrounds[0]]
            images[i] = (2 * torch.tensor(bg) - 1)[:, None, None]
            rgb = torch.tensor(COLOURS[concept.colour]) * brightness[i]
            mask = masks[concept.shape][i]
            images[i] = torch.where(mask[None], (2 * rgb - 1)[:, None, None], images[i])
        return images
