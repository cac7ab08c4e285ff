"""What a classifier someone already deployed (an IR or ONNX file) needs before the saliency
branch goes in: its input layout, and class scores the server can read as logits.

Files come as their frameworks wrote them. A Keras model converted to ONNX (tf2onnx) takes
float NHWC images; a Keras or Caffe model ends in a Softmax, so its output is probabilities
that the server would put through a softmax again (a thousand classes all near 1/1000); a
SqueezeNet or Caffe model gives its scores as [N, K, 1, 1]. Each is a pure graph edit here.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from .saliency.graph import constant_value


def input_layout(shape: ov.PartialShape) -> str | None:
    """"NCHW" or "NHWC" for a 4-D image input with 3 channels, None otherwise. NCHW where
    both could be (a [N, 3, H, 3] input): it is what PyTorch, ONNX and OpenVINO use."""
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return None
    dims = [d.get_length() if d.is_static else None for d in shape]
    if dims[1] == 3:
        return "NCHW"
    if dims[3] == 3:
        return "NHWC"
    return None


def reduced_float_type(model: ov.Model) -> ov.Type | None:
    """The first floating type other than f32 that the model computes in (an ONNX model
    converted to float16), None where it computes in f32. Weights stored in f16 and converted
    to f32 before use (an IR compressed by ovc) compute in f32."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant" or constant_value(node.output(0)) is not None:
            continue
        for output in node.outputs():
            kind = output.get_element_type()
            if kind.is_real() and kind != ov.Type.f32:
                return kind
    return None


def scores_as_logits(model: ov.Model) -> list[str]:
    """Make the first output [N, K] scores that are not probabilities yet, in place; say what
    was changed (one phrase per edit, for the model card).

    A Softmax over the classes at the end is removed: the served probabilities are the
    softmax of the output, which are then the model's own, and the maps read scores that do
    not saturate (the exporter's default, `--score logit`). [N, K, 1, 1] becomes [N, K]."""
    result = model.get_results()[0]
    edits = []
    scores = result.input_value(0)
    if _is_class_softmax(scores.get_node()):
        scores = scores.get_node().input_value(0)
        edits.append("its final Softmax removed: the output is logits")
    shape = scores.get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() == 4 \
            and all(d.is_static and d.get_length() == 1 for d in (shape[2], shape[3])):
        scores = ops.squeeze(scores, ops.constant(np.array([2, 3], np.int64))).output(0)
        edits.append("its [N, K, 1, 1] scores squeezed to [N, K]")
    if edits:
        result.input(0).replace_source_output(scores)
        model.validate_nodes_and_infer_types()
    return edits


def _is_class_softmax(node: ov.Node) -> bool:
    """A Softmax over axis 1 of [N, K] or [N, K, 1, 1]: the class axis."""
    if node.get_type_name() != "Softmax":
        return False
    rank = node.get_output_partial_shape(0).rank
    if rank.is_dynamic or rank.get_length() not in (2, 4):
        return False
    return int(node.get_attributes()["axis"]) % rank.get_length() == 1
