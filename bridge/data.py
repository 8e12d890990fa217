"""Fine-tuning data: a folder of images, each with a same-stem ``.txt`` caption.

``cat_01.png`` + ``cat_01.txt`` (one line: the caption). Images must already have the model's
size and mode: silent resizing or colour conversion would change the data the experiment claims
to fine-tune on, so a mismatch is an error that names the file (pass ``resize=True`` /
``convert=True`` to opt in).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "CaptionedImages",
    "check_caption_folder",
    "load_caption_folder",
    "save_caption_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CaptionedImages(NamedTuple):
    """Images ``(n, 3, size, size)`` float32 in [-1, 1] and their ``n`` captions; by stem."""

    images: torch.Tensor
    captions: list[str]
    stems: list[str]


def check_caption_folder(folder: str | Path) -> list[tuple[str, Path, str]]:
    """Check a caption folder's files without decoding an image: the rule the loader applies.

    Commands call this before any model loads, so that a wrong ``--data`` folder fails at once.

    Args:
      folder: directory of images (``.png``, ``.jpg``, ...) and same-stem ``.txt`` captions.

    Returns:
      ``(stem, image path, caption)`` for each image, sorted by stem.

    Raises:
      FileNotFoundError: if ``folder`` does not exist or is not a directory.
      ValueError: if the folder has no images, an image has no caption, a caption has no image,
        or a caption is empty.
    """
    folder = Path(folder)
    layout = "images with same-stem .txt captions, e.g. cat_01.png + cat_01.txt"
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {folder} (expected {layout})")
    images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".txt"}
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; expected {layout}")
    no_caption = sorted(set(images) - set(captions))
    if no_caption:
        raise ValueError(
            f"caption files do not match images in {folder}: {len(no_caption)} image(s) without a "
            f"same-stem .txt caption, e.g. {images[no_caption[0]].name} "
            f"(expected {no_caption[0]}.txt)"
        )
    no_image = sorted(set(captions) - set(images))
    if no_image:
        raise ValueError(
            f"caption files do not match images in {folder}: {len(no_image)} caption(s) without an "
            f"image, e.g. {captions[no_image[0]].name}"
        )
    found = []
    for stem in sorted(images):
        text = captions[stem].read_text().strip()
        if not text:
            raise ValueError(f"caption file {captions[stem]} is empty; write the image's caption")
        found.append((stem, images[stem], text))
    return found


def load_caption_folder(
    folder: str | Path,
    *,
    size: int,
    mode: str = "RGB",
    resize: bool = False,
    convert: bool = False,
) -> CaptionedImages:
    """Load every image of ``folder`` with its caption.

    Args:
      folder: directory of images (``.png``, ``.jpg``, ...) and same-stem ``.txt`` captions.
      size: required image side in pixels (the model's resolution).
      mode: required PIL mode (``"RGB"``).
      resize: resize images of another size instead of raising.
      convert: convert images of another mode instead of raising.

    Returns:
      :class:`CaptionedImages`.

    Raises:
      FileNotFoundError: if ``folder`` does not exist.
      ValueError: if the folder has no images, an image has no caption, a caption has no image,
        a caption is empty, or an image has the wrong size or mode.
    """
    from PIL import Image

    files = check_caption_folder(folder)
    tensors, texts, stems = [], [], []
    for stem, image_path, text in files:
        with Image.open(image_path) as img:
            if img.mode != mode:
                if not convert:
                    raise ValueError(
                        f"image {image_path.name} has mode {img.mode!r}, expected {mode!r} "
                        "(pass convert=True to convert)"
                    )
                img = img.convert(mode)
            if img.size != (size, size):
                if not resize:
                    raise ValueError(
                        f"image {image_path.name} has size {img.size[0]}x{img.size[1]}, expected "
                        f"{size}x{size} (pass resize=True to resize)"
                    )
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(arr).permute(2, 0, 1))
        texts.append(text)
        stems.append(stem)
    return CaptionedImages(torch.stack(tensors), texts, stems)


def save_caption_folder(images: torch.Tensor, captions: list[str], folder: str | Path) -> Path:
    """Write images ``(n, 3, s, s)`` in [-1, 1] as PNGs with same-stem ``.txt`` captions.

    Raises:
      ValueError: if the numbers of images and captions differ.
    """
    from PIL import Image

    if len(images) != len(captions):
        raise ValueError(
            f"{len(images)} images but {len(captions)} captions; give one caption each."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (a, c) in enumerate(zip(arr, captions, strict=True)):
        Image.fromarray(a, mode="RGB").save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(c + "\n")
    return folder


def encode_caption_folder(folder, data, unet, *, device, dtype):
    """Latents and captions of a captioned image folder, for a UNet from pipeline ``folder``.

    With a ``vae/`` in ``folder`` (real SD) images are resized to the VAE's input size and encoded
    (latent mean times the VAE's scaling factor); without one (pixel-space testbed) the images
    are the latents and must match the UNet's channel count.

    Returns:
      (latents ``(N, C, H, W)``, captions list of N strings).

    Raises:
      ValueError: images whose channels do not match a VAE-less UNet (and the errors of
        :func:`load_caption_folder`).
    """
    folder, data = Path(folder), Path(data)
    vae_dir = folder / "vae"
    if vae_dir.is_dir():
        from diffusers import AutoencoderKL

        vae = (
            AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
            .to(device, dtype)
            .eval()
        )
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        found = load_caption_folder(data, size=size, resize=True, convert=True)
        with torch.no_grad():
            latents = (
                torch.cat(
                    [
                        vae.encode(found.images[i : i + 4].to(device, dtype)).latent_dist.mean
                        for i in range(0, len(found.images), 4)
                    ]
                )
                * vae.config.scaling_factor
            )
        return latents, found.captions
    found = load_caption_folder(data, size=unet.config.sample_size, resize=True, convert=True)
    if unet.config.in_channels != found.images.shape[1]:
        raise ValueError(
            f"{folder} has no vae/, so images are used directly as latents, but they have "
            f"{found.images.shape[1]} channels and the UNet expects {unet.config.in_channels}"
        )
    return found.images.to(device, dtype), found.captions
