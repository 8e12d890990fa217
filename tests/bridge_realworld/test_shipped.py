"""The trained testbed shipped with the package: fingerprints, provenance, and that it draws."""

from __future__ import annotations

import json

import torch

from bridge.realworld.bundle import SHIPPED_MODEL, load_model
from bridge.realworld.fingerprints import verify_fingerprints
from tests.bridge_realworld._noto import requires_noto


def test_shipped_files_match_their_fingerprints_and_record_their_sources():
    files = verify_fingerprints(SHIPPED_MODEL)
    assert "unet/diffusion_pytorch_model.safetensors" in files and len(files) == 9
    assert sum((SHIPPED_MODEL / f).stat().st_size for f in files) < 20e6
    assert "CC BY-SA 4.0" in (SHIPPED_MODEL / "ATTRIBUTION.txt").read_text()
    train = json.loads((SHIPPED_MODEL / "world.json").read_text())["train"]
    assert train["unet_steps_run"] == train["config"]["steps"] == 4000
    assert train["presence_heldout_accuracy"] >= 0.9


@requires_noto
def test_the_shipped_unet_draws_what_it_is_asked_for():
    """Samples of three prompts are classified as their concept (the classifier is the judge)."""
    from bridge.generate import ddim_sample

    model = load_model(SHIPPED_MODEL)
    # pistol is left out: the base model draws it poorly (presence 0.19, docs/realworld.md)
    names = ["ship", "Statue of Liberty"]
    prompts = ["a photo of a ship", "a photo of the Statue of Liberty"]
    emb = model.text.encode_prompts(prompts + [""]).detach()
    n = 8
    images = ddim_sample(
        model.unet,
        emb[:-1].repeat_interleave(n, 0),
        emb[-1:],
        scheduler=model.scheduler,
        seeds=[1337 + i for i in range(n)] * len(prompts),
        steps=20,
    )
    probs = model.presence.probabilities(images).detach().reshape(len(prompts), n, -1)
    for i, name in enumerate(names):
        k = model.world.concepts.index(name)
        assert float(probs[i, :, k].mean()) > 0.6, (name, probs[i, :, k])
    # and not what it is not asked for: a ship prompt does not draw the Statue of Liberty
    assert float(probs[0, :, model.world.concepts.index("Statue of Liberty")].mean()) < 0.1
    assert torch.isfinite(images).all()


def test_experiment_defaults_to_the_shipped_model():
    from typer.testing import CliRunner

    from experiments.cli_bridge_realworld import realworld_app

    res = CliRunner().invoke(realworld_app, ["experiment", "--help"])
    assert res.exit_code == 0 and "default: the shipped one" in " ".join(res.output.split())
