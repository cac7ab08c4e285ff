"""The summary head (service.summary_head) computes in the graph exactly what
service.request_metrics defines: a response's scores and metrics do not depend on where they
were computed."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from xaiserve.service import request_metrics as rm
from xaiserve.service.model import SALIENCY_OUTPUT, ClassifierModel
from xaiserve.service.summary_head import (MAP_COVERAGE, PROBABILITIES, TOP_K, Summary,
                                           with_summary)


def passthrough(classes: int, maps: int, h: int = 7, w: int = 7) -> ov.Model:
    """A graph whose `logits` and `saliency_map` outputs are its inputs, so a test chooses them."""
    logits = ops.parameter([-1, classes], np.float32, "scores_in")
    saliency = ops.parameter([-1, maps, h, w], np.float32, "maps_in")
    outputs = []
    for source, name in ((logits, "logits"), (saliency, SALIENCY_OUTPUT)):
        copy = ops.convert(source, "f32")
        copy.output(0).get_tensor().set_names({name})
        outputs.append(ops.result(copy))
    return ov.Model(outputs, [logits, saliency], "passthrough")


def summaries(model: ov.Model, logits: np.ndarray, saliency: np.ndarray) -> list[Summary]:
    compiled = ov.Core().compile_model(with_summary(model, "logits", SALIENCY_OUTPUT), "CPU")
    result = compiled({0: logits, 1: saliency})
    outputs = {name: result[port] for port in compiled.outputs for name in port.get_names()}
    return [Summary.read(outputs, i) for i in range(len(logits))]


def expected_maps(saliency: np.ndarray, top: int) -> tuple[float, float]:
    chosen = saliency[top if len(saliency) > 1 else 0]
    return rm.coverage(chosen, 0.5), rm.concentration(chosen, 0.1)


@pytest.mark.parametrize("classes, maps", [(1000, 1000), (3, 3), (30, 1)])
def test_graph_summary_equals_request_metrics(classes, maps):
    rng = np.random.default_rng(classes)
    logits = (rng.normal(size=(5, classes)) * 4).astype(np.float32)
    logits[1] += 80  # large logits: the softmax must not overflow
    saliency = rng.normal(size=(5, maps, 7, 7)).astype(np.float32)
    tops = np.argmax(logits, axis=1)
    saliency[2, tops[2] if maps > 1 else 0] = 0  # no peak and no mass: 0 and 0
    saliency[3, tops[3] if maps > 1 else 0] = -np.abs(saliency[3, 0])  # all negative
    saliency[4, tops[4] if maps > 1 else 0] = 1.0  # flat: covers all, top 5 of 49 hold 5/49
    results = summaries(passthrough(classes, maps), logits, saliency)
    for i, summary in enumerate(results):
        probabilities = rm.softmax(logits[i].astype(np.float64))
        np.testing.assert_allclose(summary.probabilities, probabilities, atol=1e-6)
        assert summary.top_classes == list(np.argsort(-probabilities)[:min(TOP_K, classes)])
        assert summary.entropy == pytest.approx(rm.entropy(probabilities), abs=1e-5)
        assert summary.top1_confidence == pytest.approx(rm.top1_confidence(probabilities))
        assert summary.margin == pytest.approx(rm.margin(probabilities), abs=1e-6)
        coverage, concentration = expected_maps(saliency[i], tops[i])
        assert summary.coverage == pytest.approx(coverage, abs=1e-6)
        assert summary.concentration == pytest.approx(concentration, abs=1e-5)
    assert results[4].coverage == 1.0 and results[4].concentration == pytest.approx(5 / 49)


def test_a_map_of_another_class_is_measured_in_numpy():
    """The graph measures the top class's map only; any other target's map is measured by
    request_metrics, never given the top class's numbers."""
    rng = np.random.default_rng(0)
    logits = np.array([[5.0, 1.0, 0.0]], np.float32)
    saliency = rng.normal(size=(1, 3, 7, 7)).astype(np.float32)
    summary = summaries(passthrough(3, 3), logits, saliency)[0]
    assert summary.map_statistics(0, saliency[0, 0]) == (summary.coverage, summary.concentration)
    other = summary.map_statistics(2, saliency[0, 2])
    assert other == pytest.approx(expected_maps(saliency[0], 2))
    assert other != pytest.approx((summary.coverage, summary.concentration))


def test_a_graph_the_head_does_not_fit_is_summarised_in_numpy():
    """Logits of unknown width get no head; Summary.read computes the same from them."""
    logits = ops.parameter([-1, -1], np.float32, "scores_in")
    copy = ops.convert(logits, "f32")
    copy.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([ops.result(copy)], [logits], "dynamic_classes")
    summarised = with_summary(model, "logits", SALIENCY_OUTPUT)
    assert [port.get_names() for port in summarised.outputs] == [{"logits"}]
    scores = np.array([[0.0, 2.0, 1.0]], np.float32)
    summary = Summary.read({"logits": scores})
    assert summary.top_classes == [1, 2, 0] and summary.coverage is None
    assert summary.entropy == pytest.approx(rm.entropy(rm.softmax(scores[0].astype(float))))


def test_served_model_summary_matches_its_logits_and_map(default_export, photos):
    """The served Lite0's in-graph summary against request_metrics on its own logits and
    saliency map, for each sample photo; KServe outputs stay the IR's own."""
    model = ClassifierModel(default_export.path).load()
    outputs = model.explain_outputs(white_box=True)
    assert PROBABILITIES in outputs and MAP_COVERAGE in outputs
    batch = np.stack([model.preprocess(p) for p in photos.values()])
    for i in range(len(batch)):
        out = model.predict(batch[i:i + 1], outputs + ("logits",))
        summary = Summary.read(out)
        probabilities = rm.softmax(out["logits"][0].astype(np.float64))
        assert summary.top_classes[:5] == list(np.argsort(-probabilities)[:5])
        assert summary.entropy == pytest.approx(rm.entropy(probabilities), abs=1e-4)
        top_map = out[SALIENCY_OUTPUT][0, summary.top_classes[0]]
        assert summary.coverage == pytest.approx(rm.coverage(top_map), abs=1e-6)
        assert summary.concentration == pytest.approx(rm.concentration(top_map), abs=1e-5)
