"""Every unlearning method on the circles testbed: the erased prompt's presence falls, the others'
stays; each run is a function of its seed; the saved folder reloads to the same weights.

The testbed: red, green and blue circles on black (8x8 pixels), the tiny UNet pretrained here for
400 steps (about 30 s on one core), a CNN classifier as presence detector, presence = mean class
probability over 32 fixed sampler seeds. The SD defaults (lr 1e-5, thousands of steps) are scaled
to this model in ``TESTBED``; the scaled settings are also in docs/gpu_recipe.md.
"""

from __future__ import annotations

import time

import pytest
import torch

from bridge.generate import generate
from bridge.presence import classifier_presence
from bridge.sd import load_pipeline
from bridge.testbed.classifier import train_classifier
from bridge.testbed.train import ModelConfig, pretrain
from bridge.testbed.world import ConceptWorld
from bridge.unlearn_io import load_unlearned, save_unlearned
from bridge.unlearning.data import UnlearningData
from bridge.unlearning.mace import MaceConcept
from bridge.unlearning.names import all_method_names
from bridge.unlearning.run import DATA_METHODS, unlearn

CIRCLES = ConceptWorld(
    colours=("red", "green", "blue"), shapes=("circle",), backgrounds=("black",), size=8
)
MODEL = ModelConfig(
    block_out_channels=(8, 16),
    text_dim=32,
    attention_head_dim=2,
    norm_num_groups=4,
    text_layers=2,
    max_length=6,
)
ERASE, KEEP = CIRCLES.captions[0], list(CIRCLES.captions[1:])  # "a red circle"; green, blue

#: Per method: testbed settings and the bound on the erased prompt's presence after unlearning.
#: 0.1 where the method reaches it; otherwise its honest best on this testbed (measured, noted)
#: plus 0.08, two standard errors of a 32-image presence mean at p ~ 0.3 (sqrt(.3 * .7 / 32)).
TESTBED = {
    "uce": ({"from_token": "first"}, 0.1),  # measured 0.000
    "uce_v": ({"from_token": "first"}, 0.1),  # 0.000
    "esd_x": ({"steps": 40, "lr": 1e-3, "ddim_steps": 10}, 0.1),  # 0.057
    # ESD-u edits the layers every prompt shares: past ~0.5 the green circle goes too
    "esd_u": ({"steps": 40, "lr": 1e-3, "ddim_steps": 10, "guidance": 0.5}, 0.57),  # 0.491
    # SDD has no retain term: 45 steps reach 0.02 but take the green circle down by 0.15
    "sdd": ({"steps": 30, "lr": 1e-3, "warmup": 5, "ema_decay": 0.5, "ddim_steps": 10}, 0.56),
    "salun": ({"lr": 1.5e-3, "epochs": 20}, 0.1),  # 0.072
    "scissorhands": ({"lr": 3e-3, "epochs": 20, "snip_guidance": 7.5, "sparsity": 0.999}, 0.2),
    "erasediff": ({"lr": 2e-3, "epochs": 20, "lambda_bome": 1.0}, 0.22),  # 0.144
    "mace": ({"lora_steps": 30, "lr": 1e-2}, 0.1),  # 0.000
}
#: The issue's bound on how far any other concept's presence may fall.
OTHERS_MAX_DROP = 0.1


def test_every_method_has_a_testbed_row():
    assert sorted(TESTBED) == sorted(all_method_names())


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("circles")
    pretrain(CIRCLES, folder, cfg=MODEL, steps=400, batch_size=32, lr=1e-2, progress=False)
    pipe = load_pipeline(folder)
    clf = train_classifier(CIRCLES, steps=150, heldout=256).model
    text, sched = pipe.text_encoder, pipe.scheduler

    def presence(unet) -> list[float]:
        imgs = generate(
            unet,
            text.encode_prompts,
            list(CIRCLES.captions),
            scheduler=sched,
            seeds=list(range(32)),
            steps=10,
            guidance_scale=5.0,
        )
        return [
            float(classifier_presence(imgs[i], clf.probabilities, i).mean())
            for i in range(len(CIRCLES.captions))
        ]

    ids = torch.tensor([0] * 16 + [1] * 8 + [2] * 8)
    images = CIRCLES.sample(ids, torch.Generator().manual_seed(0))
    data = UnlearningData(
        images[:16], [ERASE] * 16, images[16:], [CIRCLES.captions[i] for i in ids[16:].tolist()]
    )
    masks = (images[:16].amax(1, keepdim=True) > -0.5).float()  # the renders' shape = the concept
    base = presence(pipe.unet)
    assert min(base) > 0.9, base  # the model draws every concept before anything is erased
    return {
        "folder": folder,
        "pipe": pipe,
        "presence": presence,
        "data": data,
        "concept": MaceConcept(ERASE, images[:16], masks),
        "base": base,
    }


def _run(testbed, name, options, seed=0):
    pipe = testbed["pipe"]
    extra = {"data": testbed["data"]} if name in DATA_METHODS else {}
    if name == "mace":
        extra["concepts"] = [testbed["concept"]]
    return unlearn(
        name,
        pipe.unet,
        pipe.text_encoder,
        pipe.scheduler,
        [ERASE],
        preserve=KEEP,
        seed=seed,
        progress=False,
        **extra,
        **options,
    )


@pytest.mark.parametrize("name", list(TESTBED))
def test_method_erases_the_prompt_and_keeps_the_rest(testbed, name, tmp_path):
    options, bound = TESTBED[name]
    t0 = time.time()
    outcome = _run(testbed, name, options)
    seconds = time.time() - t0
    after = testbed["presence"](outcome.unet)
    before = testbed["base"]
    print(f"{name}: presence {before} -> {after} in {seconds:.1f} s")
    assert after[0] <= bound, (name, after)
    drops = [b - a for b, a in zip(before[1:], after[1:], strict=True)]
    assert max(drops) <= OTHERS_MAX_DROP, (name, before, after)
    # the saved folder reloads to the same weights, checked against the base's fingerprint
    folder = save_unlearned(
        outcome.unet,
        tmp_path / name,
        method=outcome.method,
        args=outcome.args,
        seed=outcome.seed,
        base_unet=testbed["pipe"].unet,
        base_folder=testbed["folder"],
    )
    loaded = load_unlearned(testbed["pipe"].unet, folder)
    for (n, a), b in zip(
        outcome.unet.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), n


def test_mace_fusing_two_single_concept_loras_erases_both(testbed):
    pipe, data = testbed["pipe"], testbed["data"]
    green = data.retain_images[:8]
    concepts = [
        testbed["concept"],
        MaceConcept(KEEP[0], green, (green.amax(1, keepdim=True) > -0.5).float()),
    ]
    # two concepts share every word but the colour: map both to the superclass "a circle" (MACE
    # maps celebrities to "a person") and weigh the kept prompt 10x MACE's default
    out = unlearn(
        "mace",
        pipe.unet,
        pipe.text_encoder,
        pipe.scheduler,
        [ERASE, KEEP[0]],
        preserve=[KEEP[1]],
        anchors=["a circle"] * 2,
        concepts=concepts,
        progress=False,
        lora_steps=30,
        lr=1e-2,
        lam=1.0,
        preserve_weight=5e5,
    )
    after = testbed["presence"](out.unet)
    assert after[0] <= 0.1 and after[1] <= 0.1, after  # both erased by one fused model
    assert testbed["base"][2] - after[2] <= OTHERS_MAX_DROP, after
