"""`--keep-f32-first`: the backbone's first layers compute in f32 on every device, also where the
device's default precision is lower (bf16 on CPUs with AMX, such as this project's machine)."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from tests.conftest import run_cli, runtime_convolutions
from xaiserve.export.int8 import infer_all
from xaiserve.export.precision_pins import backbone_ops, kept_in_f32, leading_scope
from xaiserve.service.images import resize_for_model
from xaiserve.service.model import ClassifierModel, compiled_precision
from xaiserve.service.model_info import ModelInfo

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def pinned_export(tmp_path_factory):
    from xaiserve.export.pipeline import ExportRequest, export_model

    repo = tmp_path_factory.mktemp("pinned")
    return export_model(ExportRequest("default", repo, "lite0_pinned", keep_f32_first=0.12))


@pytest.fixture(scope="module")
def crops(default_export) -> np.ndarray:
    """Model-sized crops of real photos: many of them leave the f32 model unsure, where a
    lower precision changes the top-1 class."""
    from calibration_photos import base_photos, crops as photo_crops

    info = ModelInfo.from_model(ov.Core().read_model(default_export.path / "model.xml"))
    return np.stack([resize_for_model(image, info)
                     for image in photo_crops(base_photos(), 48, seed=3).values()])


def logits(model_path, images: np.ndarray, config: dict | None = None) -> np.ndarray:
    compiled = ov.Core().compile_model(model_path / "model.xml", "CPU", config or {})
    return infer_all(compiled, images, "logits")[0]


def test_the_first_layers_of_an_f32_export_run_in_f32_at_the_default_precision(pinned_export):
    model = ov.Core().read_model(pinned_export.path / "model.xml")
    pinned = kept_in_f32(model)
    target = ModelInfo.from_model(model).saliency_target_layer
    assert pinned == leading_scope(model, target, 0.12) and len(pinned) > 5
    card = json.loads((pinned_export.path / "model_card.json").read_text())
    assert card["precision"] == "f32"
    assert card["kept_in_f32"]["fraction"] == 0.12
    assert card["kept_in_f32"]["operations"] == len(pinned)

    compiled = ov.Core().compile_model(model, "CPU")
    default = compiled_precision(compiled)  # bf16 on a CPU with AMX, else f32
    backbone = {n.get_friendly_name() for n in backbone_ops(model, target)}
    rows = [row for row in runtime_convolutions(compiled) if row[0] & backbone]
    in_pinned = [bool(names & set(pinned)) for names, _ in rows]
    assert in_pinned[0] and sum(in_pinned) >= 4 and not all(in_pinned)
    assert [precision for _, precision in rows] == \
        ["f32" if kept else default for kept in in_pinned]


def test_pinned_layers_keep_f32_arithmetic_and_move_the_default_closer_to_it(
        default_export, pinned_export, crops):
    reference = logits(default_export.path, crops, F32)
    # where the device computes f32 anyway, the pins change nothing
    np.testing.assert_allclose(logits(pinned_export.path, crops, F32), reference, rtol=0,
                               atol=1e-5)
    plain = logits(default_export.path, crops)
    pinned = logits(pinned_export.path, crops)
    if compiled_precision(ov.Core().compile_model(default_export.path / "model.xml",
                                                  "CPU")) == "f32":
        np.testing.assert_allclose(pinned, plain, rtol=0, atol=1e-5)
        return
    # bf16 (AMX): the pinned IR's logits are nearer f32's, and it keeps more f32 top-1 classes
    assert np.abs(pinned - reference).mean() < 0.7 * np.abs(plain - reference).mean()
    kept = (pinned.argmax(1) == reference.argmax(1)).mean()
    assert kept >= (plain.argmax(1) == reference.argmax(1)).mean()


def test_the_server_serves_a_pinned_model_with_the_pins(pinned_export, photos):
    model = ClassifierModel(pinned_export.path).load()
    pinned = set(kept_in_f32(ov.Core().read_model(pinned_export.path / "model.xml")))
    for compiled in (model.compiled, model.masked_scoring().compiled):  # RISE's copy too
        rows = runtime_convolutions(compiled)
        assert any(names & pinned for names, _ in rows)
        assert all(precision == "f32" for names, precision in rows if names & pinned)
    explanation = model.explain(photos["chelsea"])
    assert explanation.predictions[0].class_id == 285  # Egyptian cat
    assert explanation.maps[285].shape == (7, 7)


def test_an_ir_source_keeps_its_pins_and_takes_more(tmp_path):
    """A deployed IR exported with pins (here a plain one, no saliency) exported again: the
    saliency insertion keeps its pins, and --keep-f32-first adds to them without doubling the
    attribute (which OpenVINO's IR reader refuses)."""
    from xaiserve.export.pipeline import ExportRequest, export_model
    from xaiserve.export.saliency import SaliencySettings

    plain = export_model(ExportRequest("default", tmp_path, "plain", keep_f32_first=0.1,
                                       saliency=SaliencySettings(method="none")))
    source = str(plain.path / "model.xml")
    pinned = kept_in_f32(ov.Core().read_model(source))
    again = export_model(ExportRequest(source, tmp_path, "again"))
    assert again.card["kept_in_f32"]["fraction"] is None
    assert kept_in_f32(ov.Core().read_model(again.path / "model.xml")) == pinned
    more = export_model(ExportRequest(source, tmp_path, "more", keep_f32_first=0.2))
    model = ov.Core().read_model(more.path / "model.xml")
    assert set(pinned) < set(kept_in_f32(model))
    assert more.card["kept_in_f32"]["fraction"] == 0.2
    assert more.card["kept_in_f32"]["operations"] == len(kept_in_f32(model))
    assert "saliency_map" in {name for out in model.outputs for name in out.get_names()}


def test_keep_f32_first_out_of_range_exits_2_before_any_work(tmp_path):
    result = run_cli("export", "default", "--repository", str(tmp_path), "--name", "x",
                     "--keep-f32-first", "1")
    assert result.returncode == 2
    assert "--keep-f32-first 1.0: a fraction in [0, 1)" in result.stderr
    assert not any(tmp_path.iterdir())
