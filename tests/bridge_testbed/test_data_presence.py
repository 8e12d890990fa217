"""Caption folders, presence hooks and CLIP loading: values and every error message."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.data import load_caption_folder, save_caption_folder
from bridge.generate import generate, initial_noise
from bridge.presence import ClipScorer, classifier_presence, nudenet_presence

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _write(folder, stem, size=8, mode="RGB", caption="a red circle"):
    arr = np.zeros((size, size, 3 if mode == "RGB" else 1), np.uint8).squeeze()
    Image.fromarray(arr, mode=mode).save(folder / f"{stem}.png")
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption)


def test_caption_folder_round_trip(tmp_path, world):
    g = torch.Generator().manual_seed(0)
    images = world.sample(torch.arange(4), g)
    save_caption_folder(images, list(world.captions), tmp_path)
    data = load_caption_folder(tmp_path, size=world.size)
    assert data.captions == list(world.captions)
    # 8-bit PNG quantisation: at most half a level, 1/255 in [-1, 1] units
    torch.testing.assert_close(data.images, images, rtol=0, atol=1 / 255 + 1e-6)


def test_caption_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("image folder does not exist")):
        load_caption_folder(tmp_path / "nope", size=8)
    with pytest.raises(ValueError, match=re.escape("no images")):
        load_caption_folder(tmp_path, size=8)
    _write(tmp_path, "a", caption=None)
    with pytest.raises(
        ValueError, match=re.escape("caption files do not match images") + ".*a.png"
    ):
        load_caption_folder(tmp_path, size=8)
    (tmp_path / "a.txt").write_text("a red circle")
    (tmp_path / "orphan.txt").write_text("a blue square")
    with pytest.raises(
        ValueError, match=re.escape("1 caption(s) without an image, e.g. orphan.txt")
    ):
        load_caption_folder(tmp_path, size=8)
    (tmp_path / "orphan.txt").unlink()
    with pytest.raises(ValueError, match=re.escape("image a.png has size 8x8, expected 16x16")):
        load_caption_folder(tmp_path, size=16)
    _write(tmp_path, "b", mode="L")
    with pytest.raises(ValueError, match=re.escape("image b.png has mode 'L', expected 'RGB'")):
        load_caption_folder(tmp_path, size=8)
    assert load_caption_folder(tmp_path, size=8, convert=True).images.shape == (2, 3, 8, 8)


def test_classifier_presence_hook():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    got = classifier_presence(torch.zeros(2, 3, 4, 4), lambda x: probs, 1)
    torch.testing.assert_close(got, torch.tensor([0.8, 0.4]))
    with pytest.raises(ValueError, match=re.escape("return probabilities, not logits")):
        classifier_presence(torch.zeros(2, 3, 4, 4), lambda x: 3 * probs, 1)
    with pytest.raises(ValueError, match=re.escape("`concept` 2 is out of range for 2 classes")):
        classifier_presence(torch.zeros(2, 3, 4, 4), lambda x: probs, 2)


def test_clip_score_from_file_equals_random_model_and_errors(tmp_path):
    scorer = ClipScorer.random(TINY_CLIP, seed=0)
    path = tmp_path / "clip.pt"
    torch.save(scorer.model.state_dict(), path)
    loaded = ClipScorer.from_file(path, TINY_CLIP)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    s1, s2 = scorer.score(images, "a red circle"), loaded.score(images, "a red circle")
    torch.testing.assert_close(s1, s2)
    # definition: 100 * max(cos, 0) between normalised image and text features
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic")
    fi = scorer.model.encode_image((x - scorer.mean) / scorer.std)
    ft = scorer.model.encode_text(scorer.tokenizer(["a red circle"]))
    want = 100 * torch.nn.functional.cosine_similarity(fi, ft).clamp_min(0)
    torch.testing.assert_close(s1, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match=re.escape("open_clip weights file not found")):
        ClipScorer.from_file(tmp_path / "missing.pt", TINY_CLIP)
    other = {**TINY_CLIP, "embed_dim": 8}
    with pytest.raises(ValueError, match=re.escape("do not match architecture 'custom model_cfg'")):
        ClipScorer.from_file(path, other)
    with pytest.raises(ValueError, match=re.escape("is not an open_clip model")):
        ClipScorer.from_file(path, "not-a-model")


def test_nudenet_hook_says_how_to_install():
    try:
        import nudenet  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=re.escape("pip install 'resurgence[nudity]'")):
            nudenet_presence(torch.zeros(1, 3, 8, 8))
    else:  # pragma: no cover - only where the extra is installed
        out = nudenet_presence(torch.zeros(1, 3, 64, 64))
        assert out.tolist() == [0.0]  # a black image has no exposed body parts


def test_generation_is_a_function_of_the_seed_list(world_model):
    unet, text, sched = world_model
    a = generate(
        unet, text.encode_prompts, ["a red circle"], scheduler=sched, seeds=[3, 4], steps=3
    )
    b = generate(unet, text.encode_prompts, ["a red circle"], scheduler=sched, seeds=[4], steps=3)
    torch.testing.assert_close(a[0, 1], b[0, 0])  # image i depends only on seeds[i]
    torch.testing.assert_close(
        initial_noise([4], (3, 2, 2))[0],
        torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(4)),
    )
    with pytest.raises(
        ValueError, match=re.escape("`prompts` must be a non-empty list of strings")
    ):
        generate(unet, text.encode_prompts, [], scheduler=sched, seeds=[0])
