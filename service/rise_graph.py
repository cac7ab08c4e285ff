"""RISE's masking and weighted sum inside the compiled model, around the classifier.

Why: RISE scores N masked copies of one image and sums the masks weighted by the scores. In
numpy the request's thread makes every masked batch (u8 -> f32 products, rounding back to u8)
and afterwards widens the N float16 masks to float32 for the sum; on 2 vCPUs of an AMX Xeon,
where the classifier itself takes about 1.5 ms per image, that Python work competes with the
inference for the same cores and makes a 1000-mask request about a fifth slower (1.71 s against
1.41 s with this graph, EfficientNet-Lite0, batch 8). In the graph both run in the plugin's
threads, fused with the rest of the inference.

The graph, for a batch of B masks of one image:
    image u8 [H, W, 3], masks f16 [B, H, W], targets i64 [T]
    -> masked images round(mask * image) as u8 [B, H, W, 3] -> the classifier -> softmax
    -> the targets' scores [B, T] -> weighted masks scores^T x masks [T, H * W]
The caller adds the weighted masks of all batches and divides by N p. A batch padded with zero
masks adds nothing to that sum, so the last batch needs no special case.

The device computes the masking and the sum at its inference precision (bf16 on AMX), so the
maps differ slightly from numpy's float32 ones (default model, chelsea, 1000 masks: Spearman
0.9999 and IoU of the top 20% 0.99 between the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .summary_head import LOGITS_OUTPUT, result_input

IMAGE = "xaiserve.rise.image"
MASKS = "xaiserve.rise.masks"
TARGETS = "xaiserve.rise.targets"
WEIGHTED_MASKS = "xaiserve.rise.weighted_masks"


@dataclass(frozen=True)
class MaskedScoring:
    """A compiled masked-scoring graph and the sizes RISE checks its requests against."""

    compiled: ov.CompiledModel
    batch: int
    height: int
    width: int
    classes: int


def _logits(model: ov.Model) -> ov.Output:
    """The output called `logits`, else the first one (as the numpy path reads it)."""
    logits = result_input(model, LOGITS_OUTPUT)
    return logits if logits is not None else model.get_results()[0].input_value(0)


def masked_scoring_graph(classifier: ov.Model, batch: int, height: int, width: int
                         ) -> ov.Model:
    """The classifier (u8 [N, H, W, 3] in, logits out) wrapped as the module docstring says.

    `classifier` is not changed: the wrapper is built on a clone, reshaped to `batch` images of
    `height` x `width`. Only the logits are kept, so a saliency branch is not computed.
    """
    graph = classifier.clone()
    images = graph.get_parameters()[0]
    graph.reshape({images.output(0): ov.PartialShape([batch, height, width, 3])})
    image = ops.parameter([height, width, 3], ov.Type.u8, name=IMAGE)
    masks = ops.parameter([batch, height, width], ov.Type.f16, name=MASKS)
    targets = ops.parameter([-1], ov.Type.i64, name=TARGETS)
    for port, name in ((image, IMAGE), (masks, MASKS), (targets, TARGETS)):
        port.output(0).get_tensor().set_names({name})
    masks_f32 = ops.convert(masks, ov.Type.f32)
    product = ops.multiply(ops.unsqueeze(masks_f32, [3]), ops.convert(image, ov.Type.f32))
    masked = ops.convert(ops.round(product, "half_away_from_zero"), ov.Type.u8)
    for consumer in list(images.output(0).get_target_inputs()):
        consumer.replace_source_output(masked.output(0))
    scores = ops.gather(ops.softmax(_logits(graph), 1), targets, 1)  # [B, T]
    flat_masks = ops.reshape(masks_f32, ops.constant(np.array([batch, height * width],
                                                              np.int64)), False)
    weighted = ops.matmul(scores, flat_masks, True, False)  # [T, H * W]
    weighted.output(0).get_tensor().set_names({WEIGHTED_MASKS})
    return ov.Model([ops.result(weighted)], [image, masks, targets], "rise_masked_scoring")


def class_count(model: ov.Model) -> int:
    """How many classes the logits have (targets are checked against it)."""
    classes = _logits(model).get_partial_shape()[-1]
    if classes.is_dynamic:
        raise ValueError("the classifier's class count is dynamic")
    return classes.get_length()
