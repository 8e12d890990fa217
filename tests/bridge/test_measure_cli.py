"""`resurgence bridge measure` end to end on a tiny pipeline saved to disk.

Its bad inputs (one line on stderr, exit code 2) are tested in ``test_cli_errors.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from typer.testing import CliRunner

from experiments.cli import app

GROUP = r"down_blocks\.0\..*attn2\.to_[kv]\."


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from bridge.groups import select_group
    from bridge.tiny import (
        TextEncoder,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        save_tiny_pipeline,
    )

    root = tmp_path_factory.mktemp("measure")
    unet = build_tiny_unet(0, sample_size=8)
    tok = build_word_tokenizer()
    save_tiny_pipeline(root / "base", unet, TextEncoder(tok, build_tiny_text_encoder(tok)))
    gen = torch.Generator().manual_seed(7)
    edit = {}
    for name in select_group(unet, GROUP).names:  # a rank-1 edit per K/V matrix, like UCE
        w = unet.get_parameter(name)
        u, v = torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)
        edit[name] = (w + 0.2 * torch.outer(u, v)).detach().contiguous()
    save_file(edit, root / "uce.safetensors")
    (root / "prompts.txt").write_text("a photo of a cat\na red car\n\na dog in the city\n")
    return root


def _run(args):
    return CliRunner().invoke(app, ["bridge", "measure", *args])


def test_measure_writes_results_and_first_step_is_exact(folders, tmp_path):
    out = tmp_path / "out"
    result = _run(
        [
            "--base",
            str(folders / "base"),
            "--unlearned",
            str(folders / "uce.safetensors"),
            "--forget-prompt",
            "van gogh style painting",
            "--finetune-prompts",
            str(folders / "prompts.txt"),
            "--params",
            GROUP,
            "--top-k",
            "2",
            "--lr",
            "0.5",
            "--steps",
            "1,4",
            "--out",
            str(out),
            "--dtype",
            "float64",
            "--batch-size",
            "2",
            "--verify",
            "--krylov-depth",
            "4",
        ]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = xr.open_dataset(out / "measurement.nc", engine="h5netcdf")
    assert ds.sizes["eigen"] == 4 and list(ds["step"].values) == [1, 4]
    # T=1 is exact for any k: one GD step moves by -lr g, and rho_k(1) = lr <g, delta>/||delta||^2.
    np.testing.assert_allclose(ds["predicted_rho"].values[0], ds["rho"].values[0], rtol=1e-9)
    assert abs(ds["predicted_rho"].values[1]) > abs(ds["predicted_rho"].values[0])
    # Every readout at T = 1 from both predictors: first order in -lr g, exact for rho (linear).
    names = list(ds["readout"].values)
    assert names == ["rho", "output_rho", "forget_loss_recovery"]
    for key in ("predicted_readouts", "krylov_readouts"):
        np.testing.assert_allclose(
            ds[key].values[0, 0], ds["measured_readouts"].values[0, 0], rtol=1e-9
        )
    # The Krylov run (depth 4 = max T) is exact for the quadratic model; the closure with 2
    # eigenpairs per end is not, so at T = 4 the two differ.
    assert ds["krylov_readouts"].values[0, 1] != ds["predicted_readouts"].values[0, 1]
    eig = ds["eigenvalues"].values
    assert eig[:2].min() >= eig[2:].max()  # LA end above the SA end
    assert (out / "manifest.json").is_file() and (out / "spectrum.png").stat().st_size > 1000
    assert "predicted_rho" in result.output


def test_measure_on_captioned_images_without_vae(folders, tmp_path):
    from bridge.data import save_caption_folder
    from bridge.tiny import (
        TextEncoder,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_word_tokenizer,
        save_tiny_pipeline,
    )

    gen = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    save_caption_folder(images, ["a red car", "a dog", "a cat", "a house"], tmp_path / "data")
    # No vae/ in the pipeline: 3-channel images are used directly as latents of a 3-channel UNet.
    rgb = build_tiny_unet(1, sample_size=8, in_channels=3)
    tok = build_word_tokenizer()
    save_tiny_pipeline(tmp_path / "rgb", rgb, TextEncoder(tok, build_tiny_text_encoder(tok)))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    w = rgb.get_parameter(name).detach()
    save_file({name: (w + 0.1 * torch.ones_like(w)).contiguous()}, tmp_path / "edit.safetensors")
    out = tmp_path / "out"
    args = [
        "--unlearned",
        str(tmp_path / "edit.safetensors"),
        "--forget-prompt",
        "van gogh",
        "--finetune-data",
        str(tmp_path / "data"),
        "--params",
        GROUP,
        "--top-k",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--dtype",
        "float64",
    ]
    result = _run(["--base", str(tmp_path / "rgb"), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = xr.open_dataset(out / "measurement.nc", engine="h5netcdf")
    assert ds.attrs["finetune_target"] == "data (eps)"
    assert np.isfinite(ds["predicted_rho"].values).all()
    result = _run(["--base", str(folders / "base"), *args])  # 4-channel UNet, RGB images
    assert result.exit_code == 2 and result.stdout == ""
    assert re.fullmatch(
        re.escape(
            f"Error: `--finetune-data` '{tmp_path / 'data'}': {folders / 'base'} has no vae/, so "
            "images are used directly as latents, but they have 3 channels and the UNet expects 4"
        )
        + "\n",
        result.stderr,
    ), result.stderr
