"""What a classifier someone already deployed (an IR, ONNX or TFLite file) needs before the
saliency branch goes in: its input layout, f32 arithmetic, a real-valued input, class scores
the server can read as logits, no saliency output of its own, a float head, and sizes that do
not depend on the batch's tensor shapes.

Files come as their frameworks wrote them. A Keras model converted to ONNX (tf2onnx) or TFLite
takes float NHWC images; a Keras or Caffe model ends in a Softmax, so its output is
probabilities that the server would put through a softmax again (a thousand classes all near
1/1000); a SqueezeNet or Caffe model gives its scores as [N, K, 1, 1]; a full-integer TFLite
model takes and gives u8 and quantises its head; a model converted to float16 for a GPU
computes in f16; an IR from OpenVINO Training Extensions has a saliency_map already; an ONNX
graph reads sizes from tensor shapes at run time. Each is a check or a graph edit in place
here.
"""

from __future__ import annotations

import re

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from xaiserve.service.model import error_reason

from .saliency.graph import (MAP_LAYOUTS, constant_value, find_global_pool, nodes_between,
                             shape_indices, static_dims)


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


# Floating types whose constants numpy holds (get_data), so that they convert exactly; bf16
# and the f8 types it has not, and those models stay refused.
WIDENED_TYPES = (ov.Type.f16, ov.Type.f64)


def float32_arithmetic(model: ov.Model) -> list[str]:
    """Make a model that computes in float16 (or float64) compute in float32, in place; say
    so. Float16 ONNX files are what onnxconverter-common's `convert_float_to_float16` and
    `torch.onnx.export` of a `.half()` module write for GPUs; the saliency branch and the
    server's CPU arithmetic are float32, and every float16 value is a float32 value, so the
    weights are kept exactly. The input, the constants and the casts to that type become
    float32; the rest follows by type inference. A model that computes in f32 is left alone."""
    kind = reduced_float_type(model)
    if kind not in WIDENED_TYPES:
        return []
    for node in model.get_ordered_ops():
        if node.get_output_size() != 1 or node.get_output_element_type(0) != kind:
            continue
        name = node.get_type_name()
        if name == "Parameter":
            node.set_element_type(ov.Type.f32)
        elif name == "Constant":
            widened = ops.constant(node.get_data().astype(np.float32))
            node.output(0).replace(widened.output(0))
        elif name == "Convert":
            node.output(0).replace(ops.convert(node.input_value(0), ov.Type.f32).output(0))
    model.validate_nodes_and_infer_types()
    return [f"its {kind.get_type_name()} arithmetic widened to f32"]


def batch_refusal(model: ov.Model) -> str | None:
    """Why the model, its input's batch free, cannot run a batch of 2: the node whose shape
    inference fails ("Reshape 'node_view' to [1,64,729]") and OpenVINO's reason; None where it
    can. torch.export writes such graphs: an example batch of 1 is specialised, `dynamic_axes`
    or not, and a transformer's reshapes then hold the 1 (a CNN's usually do not); the saliency
    branch runs masked copies of an image as one batch."""
    trial = model.clone()
    shape = trial.inputs[0].get_partial_shape()
    shape[0] = ov.Dimension(2)
    try:
        trial.reshape({trial.inputs[0]: shape})
    except Exception as exc:  # noqa: BLE001 - OpenVINO's shape inference raises RuntimeError
        found = re.search(r"While validating node '[^']*?::(\w+) ([^ ']+)", str(exc))
        nodes = {node.get_friendly_name(): node for node in model.get_ordered_ops()}
        node = nodes.get(found.group(2)) if found else None
        where = f"{node.get_type_name()} '{node.get_friendly_name()}' to " \
            f"{node.get_output_partial_shape(0)}: " if node is not None else ""
        return where + error_reason(exc, 120)
    return None


def drop_saliency_outputs(model: ov.Model) -> list[str]:
    """Remove outputs named saliency_map, in place; say so (for the model card). An IR from
    OpenVINO Training Extensions or openvino-xai carries its own, and the server reads the
    output of that name: ours would be served under another."""
    dropped = [r for r in model.get_results() if "saliency_map" in r.input_value(0).get_names()]
    for result in dropped:
        model.remove_result(result)
    return ["its own saliency_map output dropped: ours replaces it"] if dropped else []


def scores_as_logits(model: ov.Model) -> list[str]:
    """Make the first output [N, K] scores that are not probabilities yet, in place; say what
    was changed (one phrase per edit, for the model card).

    A Softmax over the classes at the end is removed: the served probabilities are the
    softmax of the output, which are then the model's own, and the maps read scores that do
    not saturate (the exporter's default, `--score logit`). [N, K, 1, 1] becomes [N, K]."""
    result = model.get_results()[0]
    edits = []
    scores = result.input_value(0)
    while _is_output_quantisation(scores.get_node()):  # an integer model's u8 probabilities
        scores = scores.get_node().input_value(0)
    if scores != result.input_value(0):
        edits.append("its output's quantisation removed")
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


def _is_output_quantisation(node: ov.Node) -> bool:
    """A Convert to integers or a FakeQuantize: how a quantised model's outputs end."""
    if node.get_type_name() == "FakeQuantize":
        return True
    return node.get_type_name() == "Convert" and not node.get_output_element_type(0).is_real()


def real_valued_input(model: ov.Model) -> list[str]:
    """Give an integer-quantised model (TensorFlow Lite's full-integer models take u8 or i8) a
    float input of the real values it was trained on, in place; say so. Its graph converts the
    integers to float and dequantises them with a FakeQuantize (after layout changes); the new
    input is mapped back onto that FakeQuantize's integer range, so that it quantises exactly as
    the model did, and the exporter's --mean and --scale mean what they mean for the float model
    (the integers' own scale, 0.0035 for a [0, 0.9] input, stays inside). A float input, and
    integers the model converts itself (u8 pixels it normalises), are left alone."""
    parameter = model.get_parameters()[0]
    if parameter.get_output_element_type(0).is_real():
        return []
    convert = _single_consumer(parameter.output(0))
    quantiser = convert
    while quantiser is not None and quantiser.get_type_name() in ("Convert", "Transpose",
                                                                  "Reshape"):
        quantiser = _single_consumer(quantiser.output(0))
    ranges = None if quantiser is None or quantiser.get_type_name() != "FakeQuantize" \
        or convert.get_type_name() != "Convert" \
        else [constant_value(quantiser.input_value(i)) for i in (1, 2, 3, 4)]
    if ranges is None or any(r is None or r.size != 1 for r in ranges):
        return []  # integers the model converts itself (pixels it normalises)
    in_low, in_high, out_low, out_high = (float(r.item()) for r in ranges)
    if out_high == out_low:
        return []
    real = ops.parameter(parameter.get_output_partial_shape(0), ov.Type.f32)
    real.output(0).get_tensor().set_names(parameter.output(0).get_names())
    levels = ops.add(ops.multiply(ops.subtract(real, np.float32(out_low)),
                                  np.float32((in_high - in_low) / (out_high - out_low))),
                     np.float32(in_low))
    for user in list(convert.output(0).get_target_inputs()):
        user.replace_source_output(levels.output(0))
    model.replace_parameter(0, real)
    model.validate_nodes_and_infer_types()
    return ["its integer input given the real values it quantises"]


def float_head(model: ov.Model) -> list[str]:
    """Compute a quantised CNN's head (what follows its global pooling) without its
    FakeQuantizes, in place; say so. ReciproCAM's copies each keep one location of the feature
    map, so their pooled features are a small fraction of the image's, and an 8-bit quantiser
    after the pooling rounds most of them to its zero (a Keras CNN's maps on the object for
    0.42 of its images against 1.0 for the float model). `xaiserve export --int8` leaves the
    head and the branch in float for the same reason; the predictions move by the head's
    rounding only."""
    scores = model.get_results()[0].input_value(0)
    pool = find_global_pool(scores, MAP_LAYOUTS)
    if pool is None:
        return []
    quantisers = [n for n in nodes_between(pool.output(0), scores)
                  if n.get_type_name() == "FakeQuantize"
                  and constant_value(n.input_value(0)) is None]  # not a weight's
    for quantiser in quantisers:
        for user in list(quantiser.output(0).get_target_inputs()):
            user.replace_source_output(quantiser.input_value(0))
    if quantisers:
        model.validate_nodes_and_infer_types()
    return ["its head after the global pooling computed in float"] if quantisers else []


def _single_consumer(output: ov.Output) -> ov.Node | None:
    users = list(output.get_target_inputs())
    return users[0].get_node() if len(users) == 1 else None


def _is_class_softmax(node: ov.Node) -> bool:
    """A Softmax over axis 1 of [N, K] or [N, K, 1, 1]: the class axis."""
    if node.get_type_name() != "Softmax":
        return False
    rank = node.get_output_partial_shape(0).rank
    if rank.is_dynamic or rank.get_length() not in (2, 4):
        return False
    return int(node.get_attributes()["axis"]) % rank.get_length() == 1


def fold_static_shape_reads(model: ov.Model) -> int:
    """Replace reads of static dimensions from tensors' shapes by constants, in place; return
    how many. ONNX files keep `B, N, C = x.shape` (a Gather from a ShapeOf) where the batch is
    dynamic, and the saliency branch cannot re-run layers on masked copies while they read a
    tensor before its target (PiT's token count) or while a reshape's output size is unknown
    (PVT v2's `reshape(B, H, W, -1)`); torch's converter folds them. Repeated until nothing
    changes: a folded reshape makes the shapes after it static."""
    total = 0
    while True:
        folded = sum(_fold_gather(node) for node in model.get_ordered_ops()
                     if node.get_type_name() == "Gather")
        folded += sum(_fold_batch_reshape(node) for node in model.get_ordered_ops()
                      if node.get_type_name() == "Reshape")
        if not folded:
            return total
        model.validate_nodes_and_infer_types()
        total += folded


def _shape_read(output: ov.Output) -> list[int | None] | None:
    """The dimensions a Gather of constant indices from a ShapeOf picks (None where dynamic),
    or the values of a constant; None for anything else."""
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return [int(v) for v in np.ravel(node.get_data())]
    indices = shape_indices(node)
    if indices is None:
        return None
    dims = static_dims(node.input_value(0).get_node().input_value(0))
    return [dims[i] for i in indices]


def _fold_gather(gather: ov.Node) -> int:
    """A Gather of static dimensions from a ShapeOf becomes their constant."""
    picked = _shape_read(gather.output(0))
    if picked is None or any(d is None for d in picked):
        return 0
    values = np.array(picked, gather.get_output_element_type(0).to_dtype())
    constant = ops.constant(values.reshape(gather.get_output_partial_shape(0).to_shape()))
    for user in list(gather.output(0).get_target_inputs()):
        user.replace_source_output(constant.output(0))
    return 1


def _fold_batch_reshape(reshape: ov.Node) -> int:
    """A Reshape to [batch read from a shape, static sizes..., maybe one -1] of an input static
    but for its batch becomes a Reshape to the constant [-1, sizes...], the -1 resolved: its
    output is then static but for the batch. The batch read must be the first element and
    the only unknown one; the tensor it reads is taken to have the input's batch."""
    pattern = reshape.input_value(1).get_node()
    if pattern.get_type_name() != "Concat" or reshape.get_output_partial_shape(0).is_static:
        return 0
    parts = [_shape_read(v) for v in pattern.input_values()]
    if any(part is None for part in parts):
        return 0
    values = [v for part in parts for v in part]
    dims = static_dims(reshape.input_value(0))
    if not values or values[0] is not None or any(v is None for v in values[1:]) \
            or dims[0] is not None or any(d is None for d in dims[1:]):
        return 0
    if reshape.get_attributes().get("special_zero"):
        values = [dims[i] if v == 0 and i < len(dims) else v for i, v in enumerate(values)]
    sizes = values[1:]
    if sizes.count(-1) > 1 or any(v < -1 or v == 0 for v in sizes):
        return 0
    if -1 in sizes:
        known = int(np.prod([v for v in sizes if v != -1]))
        elements = int(np.prod(dims[1:]))
        if known == 0 or elements % known:
            return 0
        sizes[sizes.index(-1)] = elements // known
    pattern_type = reshape.input_value(1).get_element_type().to_dtype()
    reshape.input(1).replace_source_output(
        ops.constant(np.array([-1, *sizes], pattern_type)).output(0))
    return 1
