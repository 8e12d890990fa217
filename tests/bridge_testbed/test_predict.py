"""The testbed's predicted-and-measured record: exact where the law is exact, tidy table, hygiene."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from bridge.testbed.classifier import ConceptClassifier
from bridge.testbed.predict import predict_and_measure
from bridge.testbed.results import TABLE_COLUMNS, metrics, prediction_rows, rows_to_csv
from bridge.unlearn import apply_uce, uce_token_embeddings

ERASE = "a red circle"


def _inputs(world, world_model):
    unet, text, sched = world_model
    ids = torch.tensor([1, 2, 3, 1])
    images = world.sample(ids, torch.Generator().manual_seed(0))
    forget_ids = torch.full((4,), world.concept_id(ERASE))
    forget_images = world.sample(forget_ids, torch.Generator().manual_seed(1))
    from bridge.loss import make_probe_batches

    forget = make_probe_batches(
        forget_images, text.encode_prompts([ERASE]), sched.alphas_cumprod, batch_size=4, seed=2
    )
    torch.manual_seed(0)
    classifier = ConceptClassifier(len(world.concepts)).eval()
    return {
        "text_encoder": text,
        "scheduler": sched,
        "classifier": classifier,
        "erase": ERASE,
        "concept": world.concept_id(ERASE),
        "captions": [world.captions[i] for i in ids.tolist()],
        "images": images,
        "forget_batches": forget,
        "lr_fractions": [0.3, 0.9],
        "steps": [0, 1, 3],
        "top_k": 2,
        "probe_batch": 2,
        "seeds": [5, 6],
        "sample_steps": 2,
        "guidance_scale": 3.0,
    }


@pytest.fixture(scope="module")
def record(world, world_model):
    unet, text, _ = world_model
    unlearned = apply_uce(unet, uce_token_embeddings(text, [ERASE]), edit="kv")
    return predict_and_measure(unet, unlearned, method="uce", **_inputs(world, world_model))


def test_prediction_is_exact_where_the_law_is_exact(record):
    t = record["steps"]
    for name in record["readouts"]:  # T = 0: nothing moved, on both sides
        pred, meas = np.asarray(record["predicted"][name]), np.asarray(record["measured"][name])
        np.testing.assert_allclose(pred[:, 0], meas[:, 0], rtol=0, atol=1e-6)
    pres = np.asarray(record["predicted_presence"])
    np.testing.assert_allclose(pres[:, 0], np.asarray(record["measured"]["presence"])[:, 0], atol=1e-6)
    # T = 1: one GD step moves by -lr g exactly and rho is linear in theta, so predicted and
    # measured rho agree to float32 round-off of the step (|theta| ~ 1, eps32 = 1.2e-7, times
    # ||delta|| / ||delta||^2 scaling ~ 1e2 here): 1e-4 relative.
    one = t.index(1)
    pred = np.asarray(record["predicted"]["rho"])[:, one]
    meas = np.asarray(record["measured"]["rho"])[:, one]
    np.testing.assert_allclose(pred, meas, rtol=1e-3, atol=1e-7)
    for key in ("hessian_krylov_first_order", "hessian_at_points", "ggn_krylov_first_order"):
        alt = np.asarray(record["alternatives"][key]["rho"])[:, one]
        np.testing.assert_allclose(alt, meas, rtol=1e-3, atol=1e-7)
    # the Krylov runs are exact for every T requested
    assert record["hvps"]["krylov"] == record["ggn_products"]["krylov"] == max(t)
    assert min(record["ggn_ritz_values"]) > -1e-6 * max(record["ggn_ritz_values"])  # G is PSD
    assert record["group"] == "cross-attn" and record["seeds"] == [5, 6]


def test_long_table_and_metrics(record):
    rows = prediction_rows({"uce": record})
    # 2 lrs x 2 steps (T > 0) x 5 readouts
    assert len(rows) == 2 * 2 * 5 and set(rows[0]) == set(TABLE_COLUMNS)
    assert {r["readout"] for r in rows} == {
        "presence", "output_rho", "forget_loss_recovery", "rho", "presence_logprob"
    }
    pres = [r for r in rows if r["readout"] == "presence"]
    assert pres[0]["predicted"] == record["predicted_presence"][0][1]
    text = rows_to_csv(rows)
    assert text.splitlines()[0] == ",".join(TABLE_COLUMNS) and len(text.splitlines()) == 21
    stats = metrics(rows)["rho"]
    assert stats["pooled"]["n"] == 4 and set(stats["per_method"]) == {"uce"}


def test_group_that_misses_the_edit_is_refused(world, world_model):
    unet, _, _ = world_model
    edited = copy.deepcopy(unet)
    name = "down_blocks.0.resnets.0.conv1.weight"  # an ESD-u-like edit outside attn2
    with torch.no_grad():
        edited.get_parameter(name).add_(0.01)
    message = (
        "delta = theta_u - theta_0 is zero over group 'cross-attn' (",
        "parameters); esd_u edits every parameter except attn2, time embedding, conv_out (group "
        "'non-cross-attn'): measure and fine-tune the group the method edits.",
    )
    with pytest.raises(ValueError, match=re.escape(message[0]) + r"\d+ " + re.escape(message[1])):
        predict_and_measure(unet, edited, method="esd-u", **_inputs(world, world_model))
