"""The default model, exported with its preprocessing, labels and saliency output."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from xaiserve.export.parity import compile_f32, torch_logits
from xaiserve.export.sources import create_source
from xaiserve.service.images import resize_for_model
from xaiserve.service.model import ClassifierModel
from xaiserve.service.model_info import ModelInfo


@pytest.fixture(scope="module")
def served(default_export):
    return ClassifierModel(default_export.path).load()


def test_real_photos_are_classified_right(served, photos):
    """chelsea is an Egyptian cat (285), coffee an espresso (967), through the IR's own
    preprocessing at the default (bf16 here) precision."""
    assert served.explain(photos["chelsea"]).predictions[0].class_id == 285
    assert served.explain(photos["coffee"]).predictions[0].class_id == 967
    assert served.label(285) == "Egyptian_cat"


def test_ir_matches_torch_in_f32(default_export, photos):
    source = create_source("default")
    model = ov.Core().read_model(default_export.path / "model.xml")
    compiled = compile_f32(model)
    batch = np.stack([resize_for_model(p, source.info) for p in photos.values()])
    ours = compiled(batch)["logits"]
    reference = torch_logits(source.torch_module, batch, source.info)
    assert np.abs(ours - reference).max() < 1e-3
    assert (ours.argmax(1) == reference.argmax(1)).all()


def test_ir_interface(default_export):
    model = ov.Core().read_model(default_export.path / "model.xml")
    assert model.input(0).get_element_type() == ov.Type.u8
    assert str(model.input(0).get_partial_shape()) == "[?,224,224,3]"
    assert str(model.output("logits").get_partial_shape()) == "[?,1000]"
    assert str(model.output("saliency_map").get_partial_shape()) == "[?,1000,7,7]"
    info = ModelInfo.from_model(model)
    assert model.get_rt_info(["model_info", "model_type"]).astype(str) == "Classification"
    assert len(info.labels) == 1000 and info.labels[967] == "espresso"
    assert info.mean_values == [127.0] * 3 and info.scale_values == [128.0] * 3
    assert info.embedded_processing and info.saliency_method == "reciprocam"
    assert info.saliency_target_layer


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_saliency_is_right_for_every_batch_size(served, photos, batch):
    images = [resize_for_model(p, served.info) for p in photos.values()]
    images = (images * 2)[:batch]
    out = served.predict(np.stack(images))
    assert out["saliency_map"].shape == (batch, 1000, 7, 7)
    alone = served.predict(images[-1][None])["saliency_map"][0]
    np.testing.assert_allclose(out["saliency_map"][-1], alone, atol=2e-2)


def test_model_card(default_export):
    card = json.loads((default_export.path / "model_card.json").read_text())
    assert card["parity"]["top1_agreement"] == 1.0
    assert card["parity"]["max_abs_logit_diff"] < 1e-3
    assert card["saliency"]["method"] == "reciprocam"
    assert card["saliency"]["map_shape"] == [-1, 1000, 7, 7]
    assert card["saliency"]["map_precision"] == "int8"  # ReLU6 features: auto picks int8
    assert card["input"]["shape"] == [-1, 224, 224, 3]
    assert set(card["timings"]) >= {"load_and_convert_s", "insert_s", "save_s"}
    assert (default_export.path / "labels.txt").read_text().splitlines()[285] == "Egyptian cat"
