"""Every bad input of `resurgence bridge measure | finetune | demo`: one line on stderr, exit 2.

Each case is data: the arguments that differ from a valid call, and the exact message. All but
the theta_u = theta_0 and architecture cases fail before any weights load (they read names and a
UNet built on the meta device only).
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bridge.curvature import HVP_METHODS
from bridge.finetune import OPTIMIZERS
from bridge.groups import PRESETS as GROUP_PRESETS
from bridge.loading import _STATE_DICT_SUFFIXES
from experiments.cli import app

GROUP = r"down_blocks\.0\..*attn2\.to_[kv]\."
K_WEIGHT = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
# The valid values each message lists come from the registries the code dispatches on.
PRESETS = ", ".join(GROUP_PRESETS)  # cross-attn-kv, cross-attn, attn, all
STATE_DICT_SUFFIXES = ", ".join(_STATE_DICT_SUFFIXES)  # .safetensors, .pt, .pth, .bin, .ckpt


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from bridge.data import save_caption_folder
    from bridge.groups import select_group
    from bridge.tiny import (
        TextEncoder,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        save_tiny_pipeline,
    )

    root = tmp_path_factory.mktemp("cli_errors")
    unet = build_tiny_unet(0, sample_size=8)
    tok = build_word_tokenizer()
    save_tiny_pipeline(root / "base", unet, TextEncoder(tok, build_tiny_text_encoder(tok)))
    names = select_group(unet, "cross-attn-kv").names
    gen = torch.Generator().manual_seed(7)
    edit = {n: unet.get_parameter(n).detach().clone() for n in names}
    for name in select_group(unet, GROUP).names:  # a rank-1 edit of one block, like UCE
        w = edit[name]
        edit[name] = w + 0.2 * torch.outer(
            torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)
        )
    save_file({n: t.contiguous() for n, t in edit.items()}, root / "uce.safetensors")
    same = {n: unet.get_parameter(n).detach().clone().contiguous() for n in names}
    save_file(same, root / "same.safetensors")  # theta_u = theta_0 on every K/V
    save_file({K_WEIGHT: torch.zeros(3, 3)}, root / "other_arch.safetensors")
    (root / "prompts.txt").write_text("a photo of a cat\na red car\n")
    (root / "blank.txt").write_text("\n  \n")
    save_caption_folder(torch.zeros(2, 3, 8, 8), ["a red car", "a dog"], root / "data")
    (root / "empty").mkdir()
    (root / "no_weights").mkdir()
    shutil.copy(root / "base" / "unet" / "config.json", root / "no_weights" / "config.json")
    (root / "demo.toml").write_text("seed = 0\nnope = 1\n")
    return root


def _regex_error(pattern: str) -> str:
    """CPython's own wording of a regex error (it differs between Python versions)."""
    try:
        re.compile(pattern)
    except re.error as err:
        return str(err)
    raise AssertionError(f"{pattern!r} compiles")


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Make every weight load fail loudly: a check that needs one did not run early enough."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the input was refused")

    for cls in (UNet2DConditionModel, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


def _invoke(args):
    return CliRunner().invoke(app, ["bridge", *args])


def assert_one_line_error(result, expected: str) -> None:
    """Exit code 2, nothing on stdout, exactly ``Error: <expected>`` as one line on stderr."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(re.escape(f"Error: {expected}"), lines[0]), lines[0]


def _measure_args(root, **change):
    args = {
        "--base": str(root / "base"),
        "--unlearned": str(root / "uce.safetensors"),
        "--forget-prompt": "van gogh",
        "--finetune-prompts": str(root / "prompts.txt"),
        "--params": GROUP,
        "--top-k": "2",
        "--steps": "1,4",
        "--out": str(root / "out"),
    }
    args.update(change)
    return ["measure", *[x for k, v in args.items() if v is not None for x in (k, v)]]


# (changed arguments with "{root}" for the fixture folder, expected message)
MEASURE_CASES = {
    "neither-data": (
        {"--finetune-prompts": None},
        "give exactly one of `--finetune-prompts` FILE or `--finetune-data` DIR; got neither.",
    ),
    "both-data": (
        {"--finetune-data": "{root}/data"},
        "give exactly one of `--finetune-prompts` FILE or `--finetune-data` DIR; got both.",
    ),
    "dtype": (
        {"--dtype": "float8"},
        "`--dtype` must be one of float32, float64, float16, bfloat16; got 'float8'.",
    ),
    "steps-text": (
        {"--steps": "1,x"},
        "`--steps` must be distinct integers >= 0 separated by commas, e.g. '1,10,100,1000'; "
        "got '1,x'.",
    ),
    "steps-repeated": (
        {"--steps": "1,10,10"},
        "`--steps` must be distinct integers >= 0 separated by commas, e.g. '1,10,100,1000'; "
        "got '1,10,10'.",
    ),
    "steps-negative": (
        {"--steps": "-1,5"},
        "`--steps` must be distinct integers >= 0 separated by commas, e.g. '1,10,100,1000'; "
        "got '-1,5'.",
    ),
    "steps-empty": (
        {"--steps": ","},
        "`--steps` must be distinct integers >= 0 separated by commas, e.g. '1,10,100,1000'; "
        "got ','.",
    ),
    "lr": ({"--lr": "0"}, "`--lr` must be a finite number > 0; got 0.0."),
    "top-k-zero": ({"--top-k": "0"}, "`--top-k` must be a finite number >= 1; got 0."),
    "hvp-method": (
        {"--hvp-method": "pyhessian"},
        f"`--hvp-method` must be one of {', '.join(HVP_METHODS)}; got 'pyhessian'.",
    ),
    "base-missing": (
        {"--base": "{root}/missing"},
        "`--base` '{root}/missing' does not exist; give a local diffusers UNet folder "
        "(config.json + weights) or a pipeline folder with unet/.",
    ),
    "base-not-unet": (
        {"--base": "{root}/empty"},
        "`--base` '{root}/empty': {root}/empty is not a diffusers UNet folder: missing "
        "config.json (give a UNet folder or a pipeline folder with unet/)",
    ),
    "base-no-weights": (
        {"--base": "{root}/no_weights", "--text-encoder": "{root}/base"},
        "`--base` '{root}/no_weights': missing UNet weights in {root}/no_weights: expected one "
        "of diffusion_pytorch_model.safetensors, diffusion_pytorch_model.bin, "
        "diffusion_pytorch_model.fp16.safetensors",
    ),
    "unlearned-missing": (
        {"--unlearned": "{root}/missing.safetensors"},
        "`--unlearned` '{root}/missing.safetensors' does not exist; give the unlearned UNet or "
        f"pipeline folder, or a state-dict file ({STATE_DICT_SUFFIXES}).",
    ),
    "unlearned-suffix": (
        {"--unlearned": "{root}/prompts.txt"},
        "`--unlearned` '{root}/prompts.txt' has suffix '.txt'; a state-dict file must end in "
        f"one of {STATE_DICT_SUFFIXES}.",
    ),
    "text-encoder": (
        {"--text-encoder": "{root}/empty"},
        "`--text-encoder` '{root}/empty' has no text_encoder/ and tokenizer/ folders; give the "
        "pipeline folder that holds them.",
    ),
    "prompts-missing": (
        {"--finetune-prompts": "{root}/missing.txt"},
        "`--finetune-prompts` '{root}/missing.txt' is not a file; give a text file with one "
        "prompt per line.",
    ),
    "prompts-blank": (
        {"--finetune-prompts": "{root}/blank.txt"},
        "`--finetune-prompts` '{root}/blank.txt' has no prompts; write one prompt per line.",
    ),
    "data-missing": (
        {"--finetune-prompts": None, "--finetune-data": "{root}/missing"},
        "`--finetune-data` '{root}/missing': image folder does not exist: {root}/missing "
        "(expected images with same-stem .txt captions, e.g. cat_01.png + cat_01.txt)",
    ),
    "data-empty": (
        {"--finetune-prompts": None, "--finetune-data": "{root}/empty"},
        "`--finetune-data` '{root}/empty': no images (.png, .jpg, .jpeg, .webp, .bmp) in "
        "{root}/empty; expected images with same-stem .txt captions, e.g. cat_01.png + "
        "cat_01.txt",
    ),
    "params-unknown": (
        {"--params": "qkv"},
        "`--params` 'qkv' matches no parameter of the UNet in {root}/base/unet; give a preset "
        f"({PRESETS}) or a regular expression over parameter names such as 'conv_in.weight'.",
    ),
    "params-bad-regex": (
        {"--params": "attn2.("},
        f"`--params` 'attn2.(' is not a preset ({PRESETS}) nor a valid regular expression "
        f"({_regex_error('attn2.(')}).",
    ),
    "top-k-group": (
        {"--top-k": "128"},
        f"`--top-k` must satisfy 2 x top-k < n = 256, the size of `--params` '{GROUP}'; got "
        "128. Use --top-k <= 127 or a larger group.",
    ),
    "theta-u-equals-theta-0": (
        {"--unlearned": "{root}/same.safetensors"},
        "`--unlearned` '{root}/same.safetensors' equals the base UNet on parameter group "
        f"'{GROUP}' (256 parameters): delta = theta_u - theta_0 is zero, so there is no "
        "resurgence to measure; pass weights unlearned from `--base` that edit this group.",
    ),
    "unlearned-architecture": (
        {"--unlearned": "{root}/other_arch.safetensors"},
        "`--unlearned` '{root}/other_arch.safetensors': architecture mismatch: tensor "
        f"'{K_WEIGHT}' has shape (3, 3) in the unlearned weights but (8, 16) in the base UNet",
    ),
}


def _fill(value, root):
    return None if value is None else value.replace("{root}", str(root))


#: Cases that need both UNets' weights (delta = 0, architecture): all others fail before.
LOAD_WEIGHTS = {"theta-u-equals-theta-0", "unlearned-architecture", "data-channels"}


@pytest.mark.parametrize("name", list(MEASURE_CASES))
def test_measure_bad_input_is_one_line(root, name, request):
    change, expected = MEASURE_CASES[name]
    if name not in LOAD_WEIGHTS:
        request.getfixturevalue("no_weight_loads")
    args = _measure_args(root, **{k: _fill(v, root) for k, v in change.items()})
    assert_one_line_error(_invoke(args), _fill(expected, root))


def _finetune_args(root, **change):
    args = {
        "--base": str(root / "base"),
        "--unlearned": str(root / "uce.safetensors"),
        "--data": str(root / "data"),
        "--forget-prompt": "van gogh",
        "--out": str(root / "ft"),
        "--steps": "1",
    }
    args.update(change)
    return ["finetune", *[x for k, v in args.items() if v is not None for x in (k, v)]]


FINETUNE_CASES = {
    "optimizer": (
        {"--optimizer": "rmsprop"},
        f"`--optimizer` must be one of {', '.join(OPTIMIZERS)}; got 'rmsprop'.",  # sgd, adamw
    ),
    "steps": ({"--steps": "-1"}, "`--steps` must be a finite number >= 0; got -1."),
    "track-every": ({"--track-every": "0"}, "`--track-every` must be a finite number >= 1; got 0."),
    "base-is-a-unet-folder": (
        {"--base": "{root}/base/unet"},
        "`--base` '{root}/base/unet' has no text_encoder/config.json; this command needs a "
        "pipeline folder with unet/, text_encoder/, tokenizer/, scheduler/.",
    ),
    "unlearned-missing": (
        {"--unlearned": "{root}/missing"},
        "`--unlearned` '{root}/missing' does not exist; give the unlearned UNet or pipeline "
        f"folder, or a state-dict file ({STATE_DICT_SUFFIXES}).",
    ),
    "data-empty": (
        {"--data": "{root}/empty"},
        "`--data` '{root}/empty': no images (.png, .jpg, .jpeg, .webp, .bmp) in {root}/empty; "
        "expected images with same-stem .txt captions, e.g. cat_01.png + cat_01.txt",
    ),
    "trainable-unknown": (
        {"--trainable": "lora-kv"},
        "`--trainable` 'lora-kv' matches no parameter of the UNet in {root}/base/unet; give a "
        f"preset ({PRESETS}, lora) or a regular expression over parameter names such as "
        "'conv_in.weight'.",
    ),
    "clip-weights": (
        {"--clip-weights": "{root}/clip.pt"},
        "`--clip-weights` '{root}/clip.pt' is not a file; give the local open_clip checkpoint "
        "(nothing is downloaded), or leave it out to skip CLIP presence.",
    ),
    "theta-u-equals-theta-0": (
        {"--unlearned": "{root}/same.safetensors"},
        "`--unlearned` '{root}/same.safetensors' equals the base UNet on parameter group "
        "'cross-attn-kv' (1280 parameters): delta = theta_u - theta_0 is zero, so there is no "
        "resurgence to measure; pass weights unlearned from `--base` that edit this group.",
    ),
    "data-channels": (  # RGB images, a 4-channel UNet and no vae/
        {},
        "`--data` '{root}/data': {root}/base has no vae/, so images are the UNet's inputs, but "
        "they have 3 channels and the UNet expects 4",
    ),
}


@pytest.mark.parametrize("name", list(FINETUNE_CASES))
def test_finetune_bad_input_is_one_line(root, name, request):
    change, expected = FINETUNE_CASES[name]
    if name not in LOAD_WEIGHTS:
        request.getfixturevalue("no_weight_loads")
    args = _finetune_args(root, **{k: _fill(v, root) for k, v in change.items()})
    assert_one_line_error(_invoke(args), _fill(expected, root))
    assert not (root / "ft").exists()  # refused before anything was written


def test_demo_bad_input_is_one_line(root):
    from bridge.testbed.demo import METHODS, DemoConfig

    known = sorted(f.name for f in dataclasses.fields(DemoConfig))
    assert_one_line_error(
        _invoke(["demo", "--config", str(root / "missing.toml")]),
        f"`--config` '{root}/missing.toml' is not a file; give a TOML file of flat keys, or "
        "leave it out for experiments/configs/bridge_testbed.toml.",
    )
    assert_one_line_error(
        _invoke(["demo", "--config", str(root / "demo.toml")]),
        f"`--config` '{root}/demo.toml': unknown config keys ['nope'] in {root}/demo.toml; "
        f"known: {known}.",
    )
    for bad in ("nope=1", "seed"):
        assert_one_line_error(
            _invoke(["demo", "--set", "seed=1", "--set", bad]),
            f"`--set` '{bad}' must be KEY=VALUE with KEY one of {', '.join(known)} (VALUE in "
            "TOML syntax, e.g. --set seed=1).",
        )
    assert_one_line_error(  # a known key whose value the config refuses
        _invoke(["demo", "--set", "methods=['sdd']"]),
        "`--set` 'methods=['sdd']': `methods` has unknown entries ['sdd']; allowed: "
        f"{list(METHODS)}.",
    )
