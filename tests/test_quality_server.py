"""Explanation-quality metrics through a real server on a real port: Shared Interest and the
pointing game from ground truth, faithfulness from extra inferences of the served model, each
with its parameters, equal to the library computed directly on the same map; bad ground truth
and metric names give INVALID_ARGUMENT and the server keeps serving; the CLI writes them."""

from __future__ import annotations

import json
import shutil

import cv2
import grpc
import numpy as np
import pytest

from tests.conftest import run_cli
from xaiserve.service import faithfulness as fm
from xaiserve.service.client import XaiClient
from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.explanation_quality import model_scorer, saliency_on_image
from xaiserve.service.model import ClassifierModel
from xaiserve.service.server import Server
from xaiserve.service.shared_interest import (PATTERNS, Binarization, ground_truth_mask,
                                              pointing_game_hit, shared_interest,
                                              shared_interest_pattern)

MODEL = "efficientnet_lite0"
CAT = 285  # Egyptian cat
FACE = (100.0, 40.0, 380.0, 300.0)  # the cat's face in scikit-image's chelsea (451 x 300)


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def repository(default_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("quality")
    shutil.copytree(default_export.path, repo / MODEL / "1")
    return repo


@pytest.fixture(scope="module")
def server(repository):
    settings = ServerSettings(repository=repository, host="127.0.0.1", port=0,
                              defaults=ModelSettings())
    srv = Server(settings).start()
    yield srv
    srv.stop(grace=2)


@pytest.fixture(scope="module")
def client(server):
    c = XaiClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def local_model(repository):
    return ClassifierModel(repository / MODEL / "1").load()


@pytest.fixture(scope="module")
def f32_model(repository):
    """The served IR computed in f32: on a CPU with bf16 (AMX) the default precision moves the
    scores by about 1e-4 when a blurred pixel rounds to the next level, which is arithmetic,
    not the metric's algorithm that the comparison with the reference package checks."""
    return ClassifierModel(repository / MODEL / "1",
                           config={"INFERENCE_PRECISION_HINT": "f32"}).load()


@pytest.fixture(scope="module")
def chelsea(photos):
    return photos["chelsea"]


def by_name(response) -> dict:
    return {m.name: m for m in response.metrics}


def decoded(image: np.ndarray) -> np.ndarray:
    """The image as the server sees it after JPEG."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg(image), np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


def float_map(response) -> np.ndarray:
    entry = response.maps[0]
    return np.array(entry.values, np.float32).reshape(list(entry.shape))


def test_box_and_label_give_shared_interest_with_parameters(client, chelsea):
    response = client.explain(jpeg(chelsea), MODEL, map_format="float", label=CAT,
                              boxes=[FACE])
    assert response.predictions[0].class_id == CAT
    metrics = by_name(response)
    for name in ("iou", "gtc", "sc", "sc_mass", "pointing_game", "shared_interest_pattern"):
        assert name in metrics, name
    for name in ("iou", "gtc", "sc"):
        params = metrics[name].parameters
        assert params["binarization"] == "std" and params["binarization_value"] == "1"
        assert params["normalization"] == "min-max"
        assert params["class_id"] == str(CAT) and params["ground_truth"] == "boxes"
    pattern = metrics["shared_interest_pattern"]
    assert pattern.text in PATTERNS[:4]  # a correct prediction
    assert pattern.parameters["correct"] == "true" and pattern.parameters["iou_high"] == "0.5"

    # The same numbers from the library on the map the server sent.
    image = decoded(chelsea)
    on_image = saliency_on_image(float_map(response), *image.shape[:2])
    truth = ground_truth_mask(*image.shape[:2], boxes=[FACE])
    scores = shared_interest(on_image, truth, Binarization())
    assert metrics["iou"].value == pytest.approx(scores.iou)
    assert metrics["gtc"].value == pytest.approx(scores.gtc)
    assert metrics["sc"].value == pytest.approx(scores.sc)
    assert metrics["sc_mass"].value == pytest.approx(scores.sc_mass, rel=1e-5)
    assert metrics["pointing_game"].value == float(pointing_game_hit(on_image, truth))
    assert pattern.text == shared_interest_pattern(scores, True)
    assert metrics["pointing_game"].value == 1.0  # the map's peak is on the cat's face
    # A wrong label turns the pattern into its wrong-prediction twin.
    wrong = by_name(client.explain(jpeg(chelsea), MODEL, label=1, boxes=[FACE]))
    assert wrong["shared_interest_pattern"].text == \
        PATTERNS[4 + PATTERNS.index(pattern.text)]


def test_mask_and_binarization_options(client, chelsea):
    h, w = chelsea.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[40:300, 100:380] = 255
    png = cv2.imencode(".png", mask)[1].tobytes()
    from_mask = by_name(client.explain(jpeg(chelsea), MODEL, mask=png))
    from_box = by_name(client.explain(jpeg(chelsea), MODEL, boxes=[FACE]))
    assert from_mask["iou"].value == pytest.approx(from_box["iou"].value)
    assert from_mask["iou"].parameters["ground_truth"] == "mask"
    assert "shared_interest_pattern" not in from_mask  # no label
    loose = by_name(client.explain(jpeg(chelsea), MODEL, boxes=[FACE], metric_options={
        "binarization": "percentile", "binarization_value": 50.0}))
    assert loose["sc"].parameters["binarization"] == "percentile"
    assert loose["sc"].parameters["binarization_value"] == "50"
    assert loose["gtc"].value > from_box["gtc"].value  # half the image selected, not ~16 %


def test_faithfulness_metrics_equal_the_library_on_the_same_map(client, chelsea, local_model):
    options = {"steps": 16, "substrate": "blur"}
    response = client.explain(jpeg(chelsea), MODEL, map_format="float", metrics=["all"],
                              metric_options=options)
    metrics = by_name(response)
    assert set(fm.METRIC_NAMES) <= set(metrics)
    assert "iou" not in metrics  # no ground truth: Shared Interest is not computed for "all"
    deletion = metrics["deletion_auc"].parameters
    assert deletion["substrate"] == "blur" and deletion["steps"] == "16"
    assert deletion["score"] == "softmax" and deletion["class_id"] == str(CAT)
    assert deletion["blur_kernel"] == str(fm.blur_kernel_size(224))
    assert metrics["average_drop"].parameters["substrate"] == "blur"

    image = decoded(chelsea)
    tensor = local_model.preprocess(image)
    settings = fm.FaithfulnessSettings(steps=16).with_substrate("blur")
    expected = {v.name: v for v in fm.compute(fm.METRIC_NAMES, tensor, float_map(response),
                                              CAT, model_scorer(local_model), settings)}
    for name, value in expected.items():
        assert metrics[name].value == pytest.approx(value.value, rel=1e-3, abs=1e-4), name
        assert dict(metrics[name].parameters) == value.parameters, name
    # A faithful map: deleting its most salient cells hurts more than revealing them helps late.
    assert metrics["deletion_auc"].value < metrics["insertion_auc"].value


def test_real_model_deletion_and_insertion_agree_with_saliency_maps_metrics(
        client, chelsea, f32_model, monkeypatch):
    """The served model's map and the real model (in f32) through the package's own loop (7
    steps of 7 cells of the 7x7 map). The map's many zero cells are ties whose order torch.topk
    leaves unspecified (ours: raster order), so a ramp far below the map's resolution breaks
    them."""
    import torch
    from saliency_maps_metrics.multi_step_metrics import Deletion, Insertion

    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # gone from numpy 2.4
    score = model_scorer(f32_model)

    def model(data: torch.Tensor) -> torch.Tensor:
        u8 = np.clip(np.rint(data.permute(0, 2, 3, 1).numpy()), 0, 255).astype(np.uint8)
        return torch.from_numpy(score(u8))

    response = client.explain(jpeg(chelsea), MODEL, map_format="float")
    saliency = float_map(response).astype(np.float64)
    saliency -= np.arange(saliency.size).reshape(saliency.shape) * 1e-6
    tensor = f32_model.preprocess(decoded(chelsea))
    data = torch.from_numpy(tensor.astype(np.float32)).permute(2, 0, 1)[None]
    explanation = torch.from_numpy(saliency)[None, None]
    settings = fm.FaithfulnessSettings(steps=7)
    for metric, kind, key, substrate in [(Deletion("black", max_step_nb=7), "deletion", "dauc",
                                          "black"),
                                         (Insertion("blur", max_step_nb=7), "insertion", "iauc",
                                          "blur"),
                                         (Deletion("blur", max_step_nb=7), "deletion", "dauc",
                                          "blur")]:
        ours = fm.deletion_insertion(tensor, saliency, CAT, score, kind,
                                     settings.with_substrate(substrate))
        theirs = metric(model, data, explanation, [CAT])
        assert ours.auc == pytest.approx(float(theirs[key]), rel=1e-4, abs=1e-5), kind


def test_bad_ground_truth_and_metric_names_are_invalid_argument(client, chelsea, server):
    good = jpeg(chelsea)
    wrong_size = cv2.imencode(".png", np.zeros((10, 10), np.uint8))[1].tobytes()
    cases = [
        (dict(mask=wrong_size), grpc.StatusCode.INVALID_ARGUMENT,
         ["ground_truth.mask_png", "10x10"]),
        (dict(boxes=[(400, 10, 500, 100)]), grpc.StatusCode.INVALID_ARGUMENT,
         ["ground_truth.boxes[0]", "outside"]),
        (dict(boxes=[FACE, (50, 50, 40, 60)]), grpc.StatusCode.INVALID_ARGUMENT,
         ["ground_truth.boxes[1]", "x_min < x_max"]),
        (dict(metrics=["deletion_auc", "aopc"]), grpc.StatusCode.INVALID_ARGUMENT,
         ["metrics[1]", "'aopc'", "insertion_auc"]),
        (dict(metrics=["iou"]), grpc.StatusCode.INVALID_ARGUMENT,
         ["ground_truth.boxes"]),
        (dict(metrics=["faithfulness"], metric_options={"substrate": "noise"}),
         grpc.StatusCode.INVALID_ARGUMENT, ["metric_options", "noise"]),
        (dict(metrics=["faithfulness"], metric_options={"steps": 100_000}),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["metric_options.steps", "256"]),
        (dict(boxes=[FACE], metric_options={"binarization": "otsu"}),
         grpc.StatusCode.INVALID_ARGUMENT, ["metric_options", "otsu"]),
        (dict(boxes=[FACE], thresholds={"iou_hgh": 0.3}),
         grpc.StatusCode.INVALID_ARGUMENT, ["thresholds['iou_hgh']", "iou_high"]),
    ]
    for kwargs, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            client.explain(good, MODEL, **kwargs)
        assert info.value.code() == code, info.value.details()
        for word in words:
            assert word in info.value.details(), info.value.details()
        assert client.explain(good, MODEL).predictions[0].class_id == CAT  # still serving


def test_cli_writes_metrics_with_parameters(server, tmp_path, chelsea):
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(jpeg(chelsea))
    result = run_cli("explain", str(photo), "--server", f"127.0.0.1:{server.port}",
                     "--model", MODEL, "--label", str(CAT), "--box", "100,40,380,300",
                     "--metrics", "average_drop,deletion_auc", "--steps", "8",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "chelsea.json").read_text())
    metrics = {m["name"]: m for m in record["metrics"]}
    assert metrics["shared_interest_pattern"]["text"] in PATTERNS
    assert metrics["gtc"]["parameters"]["binarization"] == "std"
    assert metrics["deletion_auc"]["parameters"]["steps"] == "8"
    assert 0.0 <= metrics["average_drop"]["value"] <= 1.0

    for args, words in [(["--box", "1,2,3"], "--box '1,2,3'"),
                        (["--metrics", "all,aopc"], "--metrics"),
                        (["--mask", str(tmp_path / "missing.png")], "--mask")]:
        bad = run_cli("explain", str(photo), "--server", f"127.0.0.1:{server.port}",
                      "--model", MODEL, *args, "--out", str(tmp_path / "out"))
        assert bad.returncode == 2, bad.stderr
        assert words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
