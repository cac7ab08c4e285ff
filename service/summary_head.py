"""The numbers every white-box Explain response carries, computed inside the compiled model.

Why in the graph: the handler's Python after an inference runs cold. On the 2-vCPU test
machine a numpy call on 1000 scores costs 80 to 150 us after a pause of a few milliseconds
against 15 to 20 back to back, so softmax, sorting, entropy, margin and the two map statistics
took 0.4 ms of each Explain. Appended to the graph they add about 0.05 ms to the inference
(OpenVINO's per-node profile), and the handler reads five small arrays: an Explain took 0.979
to 0.985 of its time without the head, 0.18 to 0.36 ms less (benchmarks/summary_head_ab.py).
`service.request_metrics` stays the definition and measures the maps that do not come from the
graph (RISE's, another target's); the tests hold the two equal.

The head's outputs are the server's own: KServe clients see only `logits` and `saliency_map`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from . import request_metrics

LOGITS_OUTPUT = "logits"  # what Summary.read falls back on
PROBABILITIES = "xaiserve.probabilities"  # softmax of the logits [N, K]
TOP_CLASSES = "xaiserve.top_classes"  # class ids by score [N, min(TOP_K, K)]
ENTROPY = "xaiserve.entropy"  # of the softmax, nats [N]
MAP_COVERAGE = "xaiserve.map_coverage"  # of the top class's saliency map [N]
MAP_CONCENTRATION = "xaiserve.map_concentration"  # the same [N]
SCORE_OUTPUTS = (PROBABILITIES, TOP_CLASSES, ENTROPY)
MAP_OUTPUTS = (MAP_COVERAGE, MAP_CONCENTRATION)
TOP_K = 20  # classes ranked; also the most targets an Explain may ask for by rank
# The map statistics' parameters, as service.request_metrics defines them.
COVERAGE_THRESHOLD = 0.5
CONCENTRATION_TOP_FRACTION = 0.1


def result_input(model: ov.Model, name: str) -> ov.Output | None:
    """The node output that feeds the result called `name` (None: no such result)."""
    for result in model.get_results():
        if name in result.output(0).get_names():
            return result.input_value(0)
    return None


def _named_result(output: ov.Output, name: str) -> ov.Node:
    output.get_tensor().set_names({name})
    return ops.result(output)


def _score_head(logits: ov.Output) -> tuple[list[ov.Node], ov.Output]:
    """The score outputs, and the top classes for the map head."""
    classes = logits.get_partial_shape()[1].get_length()
    probabilities = ops.softmax(logits, 1)
    entropy = ops.negative(ops.reduce_sum(
        ops.multiply(probabilities, ops.log_softmax(logits, 1)), [1], keep_dims=False))
    top = ops.topk(logits, min(TOP_K, classes), 1, "max", "value", "i32")
    return [_named_result(probabilities.output(0), PROBABILITIES),
            _named_result(top.output(1), TOP_CLASSES),
            _named_result(entropy.output(0), ENTROPY)], top.output(1)


def _map_head(saliency: ov.Output, top_classes: ov.Output) -> list[ov.Node]:
    """Coverage and concentration of the top class's map in [N, M, h, w] (of the one map
    where M is 1), as request_metrics defines them: 0 where the map has no positive peak or
    mass. Only that map: the statistics of all 1000 maps cost 0.2 ms per inference."""
    maps, h, w = (saliency.get_partial_shape()[i].get_length() for i in (1, 2, 3))
    if maps > 1:
        first = ops.slice(top_classes, np.array([0]), np.array([1]), np.array([1]), np.array([1]))
        saliency = ops.gather(saliency, first, 1, 1)  # [N, 1, h, w]
    flat = ops.reshape(ops.convert(saliency, "f32"), ops.constant(np.array([0, -1])), True)
    zero = ops.constant(np.float32(0))
    peak = ops.reduce_max(flat, [1], keep_dims=True)
    above = ops.greater_equal(flat, ops.multiply(peak, ops.constant(
        np.float32(COVERAGE_THRESHOLD))))
    coverage = ops.select(ops.greater(ops.squeeze(peak, [1]), zero),
                          ops.reduce_mean(ops.convert(above, "f32"), [1]), zero)
    positive = ops.maximum(flat, zero)
    total = ops.reduce_sum(positive, [1])
    k = max(1, int(round(CONCENTRATION_TOP_FRACTION * h * w)))
    top_mass = ops.reduce_sum(ops.topk(positive, k, 1, "max", "none").output(0), [1])
    concentration = ops.select(ops.greater(total, zero), ops.divide(top_mass, total), zero)
    return [_named_result(coverage.output(0), MAP_COVERAGE),
            _named_result(concentration.output(0), MAP_CONCENTRATION)]


def with_summary(model: ov.Model, logits_name: str, saliency_name: str) -> ov.Model:
    """A copy of `model` with the summary outputs added: the score outputs where the output
    `logits_name` is [N, K] with K known, and then the map outputs where `saliency_name` is
    [N, M, h, w] with M, h and w known. For a graph of another form the handler computes
    what the graph does not (Summary.read)."""
    summarised = model.clone()
    logits = result_input(summarised, logits_name)
    if logits is None or logits.get_partial_shape().rank.get_length() != 2 \
            or logits.get_partial_shape()[1].is_dynamic:
        return summarised
    heads, top_classes = _score_head(logits)
    saliency = result_input(summarised, saliency_name)
    if saliency is not None and saliency.get_partial_shape().rank.get_length() == 4 \
            and all(saliency.get_partial_shape()[i].is_static for i in (1, 2, 3)):
        heads += _map_head(saliency, top_classes)
    summarised.add_results(heads)
    return summarised


@dataclass(frozen=True)
class Summary:
    """One image's summary, read from the outputs of a summarised model."""

    probabilities: np.ndarray  # [K]
    top_classes: list[int]  # class ids by score, the first min(TOP_K, K)
    entropy: float
    coverage: float | None = None  # of the top class's saliency map
    concentration: float | None = None

    @classmethod
    def read(cls, outputs: dict[str, np.ndarray], index: int = 0) -> "Summary":
        """From the summary outputs, or from `logits` in numpy where the head did not fit."""
        if PROBABILITIES in outputs:
            scores = (outputs[PROBABILITIES][index], outputs[TOP_CLASSES][index].tolist(),
                      float(outputs[ENTROPY][index]))
        else:
            scores = cls.scores_of(outputs[LOGITS_OUTPUT][index])
        if MAP_COVERAGE not in outputs:
            return cls(*scores)
        return cls(*scores, float(outputs[MAP_COVERAGE][index]),
                   float(outputs[MAP_CONCENTRATION][index]))

    @staticmethod
    def scores_of(logits: np.ndarray) -> tuple[np.ndarray, list[int], float]:
        """Probabilities, top classes and entropy of one image's logits, in numpy."""
        probabilities = request_metrics.softmax(logits.astype(np.float64))
        return (probabilities, np.argsort(-probabilities, kind="stable")[:TOP_K].tolist(),
                request_metrics.entropy(probabilities))

    def order(self, count: int) -> list[int]:
        """The first `count` class ids by score (a full sort only beyond the head's top)."""
        if count <= len(self.top_classes):
            return self.top_classes[:count]
        return np.argsort(-self.probabilities, kind="stable")[:count].tolist()

    def map_statistics(self, class_id: int, saliency: np.ndarray) -> tuple[float, float]:
        """Coverage and concentration of `saliency`, the map of `class_id`: from the graph
        where it computed them for this class (the top one), else from request_metrics."""
        if self.coverage is not None and class_id == self.top_classes[0]:
            return self.coverage, self.concentration
        return (request_metrics.coverage(saliency, COVERAGE_THRESHOLD),
                request_metrics.concentration(saliency, CONCENTRATION_TOP_FRACTION))

    @property
    def top1_confidence(self) -> float:
        return float(self.probabilities[self.top_classes[0]])

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 probability (the top-1 one for a single class)."""
        first = self.top1_confidence
        if len(self.top_classes) < 2:
            return first
        return first - float(self.probabilities[self.top_classes[1]])
