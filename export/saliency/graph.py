"""Graph surgery helpers on OpenVINO models: find targets by structure, re-run a tail.

Everything here works on `openvino.Model` objects only (no torch), so the same code inserts
saliency into models converted from PyTorch and into IR or ONNX files someone already deployed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import openvino as ov
from openvino import opset13 as ops


class InsertionError(ValueError):
    """The saliency branch cannot be built; the message says which option to give."""


def const(values, dtype=np.int64) -> ov.Node:
    return ops.constant(np.asarray(values, dtype=dtype))


def key(node: ov.Node) -> str:
    """A stable identity for a node (Python wrappers are recreated on every access, so their
    id() is not one); OpenVINO's unique internal name is."""
    return node.get_name()


def node_name(output: ov.Output) -> str:
    return output.get_node().get_friendly_name()


def static_dims(output: ov.Output) -> list[int | None]:
    shape = output.get_partial_shape()
    return [d.get_length() if d.is_static else None for d in shape]


def ancestors(output: ov.Output, through: ov.Node | None = None,
              shapes: bool = True) -> set[str]:
    """Ids of every node `output` depends on (including its own node); with `through`, on
    paths that do not pass through that node; without `shapes`, not through a ShapeOf (a read
    of a tensor's shape carries none of its values)."""
    seen: set[str] = set()
    stack = [output.get_node()]
    while stack:
        node = stack.pop()
        if key(node) in seen or (through is not None and key(node) == key(through)):
            continue
        seen.add(key(node))
        if shapes or node.get_type_name() != "ShapeOf":
            stack.extend(v.get_node() for v in node.input_values())
    return seen


def is_bottleneck(node: ov.Node, scores: ov.Output) -> bool:
    """Whether every value the scores read from the image passes through `node`: true of a
    head's global pooling, false of a normalisation's statistics (an RMSNorm's mean of squares),
    which multiply back into the tensor they were taken from."""
    upstream = ancestors(node.input_value(0), shapes=False)
    around = ancestors(scores, through=node, shapes=False)
    constants = {key(n) for n in _upstream_nodes(scores) if n.get_type_name() == "Constant"}
    return not (upstream & around) - constants


def _upstream_nodes(output: ov.Output) -> list[ov.Node]:
    seen: dict[str, ov.Node] = {}
    stack = [output.get_node()]
    while stack:
        node = stack.pop()
        if key(node) in seen:
            continue
        seen[key(node)] = node
        stack.extend(v.get_node() for v in node.input_values())
    return list(seen.values())


def nodes_between(start: ov.Output, end: ov.Output) -> list[ov.Node]:
    """The nodes `end` depends on that do not come before `start` (a block's own layers)."""
    before = ancestors(start)
    return [n for n in _upstream_nodes(end) if key(n) not in before]


def score_output(model: ov.Model) -> ov.Output:
    """The tensor of class scores: what feeds the first result of shape [N, K]."""
    for result in model.get_results():
        if result.get_output_partial_shape(0).rank.get_length() == 2:
            return result.input_value(0)
    raise InsertionError(
        "the model has no [N, num_classes] output; only classifiers can be explained "
        "(give --method none to export without saliency)"
    )


def find_by_name(model: ov.Model, name: str) -> ov.Output:
    """The output of the node whose friendly name is `name` (for --target-layer)."""
    for node in model.get_ordered_ops():
        if node.get_friendly_name() == name:
            return node.output(0)
    raise InsertionError(f"--target-layer {name!r}: no node of that name in the model")


@dataclass
class Tail:
    """The part of the network between a target tensor and the class scores, re-runnable on a
    new input (for example a batch of masked copies of the target)."""

    model: ov.Model
    target: ov.Output
    scores: ov.Output

    def run_on(self, new_input: ov.Output) -> ov.Output:
        """Clone the tail, feed it `new_input` instead of the target, return the new scores."""
        return self.run_with([(self.target, new_input)])

    def run_with(self, replacements: list[tuple[ov.Output, ov.Output]],
                 rows: tuple[ov.Output, list[int]] | None = None,
                 edit: Callable[[Callable[[ov.Output], ov.Output]], None] | None = None
                 ) -> ov.Output:
        """Clone the tail with each listed tensor replaced by its new input (the target, and
        where a method needs it a tensor inside the tail), return the new scores. `rows`
        (a tensor [N, tokens, dim] in the tail, token indices): from that tensor on, the clone
        computes only those tokens, for a head that reads no others. `edit` gets a function
        from a tensor of the model to its copy in the clone, and may change the clone.

        The clone starts from a copy of the whole model; its copies of those tensors' consumers
        are rewired to the new inputs, so only the tail stays reachable from the new scores.
        """
        clone = self.model.clone()
        originals = self.model.get_ordered_ops()
        copies = clone.get_ordered_ops()
        if len(originals) != len(copies):
            raise InsertionError("could not clone the model graph for the saliency branch")
        copy_of = {key(o): c for o, c in zip(originals, copies)}

        def copy(tensor: ov.Output) -> ov.Output:
            return copy_of[key(tensor.get_node())].output(tensor.get_index())

        scores_copy = copy(self.scores)
        for original, new_input in replacements:
            for consumer in list(copy(original).get_target_inputs()):
                consumer.replace_source_output(new_input)
        if edit is not None:
            edit(copy)
        if rows is not None:
            tensor, indices = rows
            copied = copy(tensor)
            consumers = list(copied.get_target_inputs())
            kept = ops.gather(copied, const(indices), const(1)).output(0)
            for consumer in consumers:
                consumer.replace_source_output(kept)
        _make_batch_free(scores_copy, [new for _, new in replacements])
        own_inputs = {key(p) for p in self.model.get_parameters()}
        leaked = [
            n for n in _upstream_nodes(scores_copy)
            if n.get_type_name() == "Parameter" and key(n) not in own_inputs
        ]
        if leaked:
            raise InsertionError(
                f"the layers after {node_name(self.target)!r} read the model input directly, so "
                "they cannot be re-run on masked copies; give another --target-layer, or "
                "--method none (the server then explains the model with RISE)"
            )
        return scores_copy


def _make_batch_free(scores: ov.Output, new_inputs: list[ov.Output]) -> None:
    """Reshapes in the tail often take the batch size from the model input (`x.view(bs, -1)`).
    When a Reshape's output is static except for the batch dimension, a constant pattern with -1
    there is equivalent and does not depend on the input's batch size. Where the batch size was
    read once before the target (`B, N, C = x.shape` in MViTv2) and reshapes with two unknown
    dimensions use it, that reading takes the new input's batch size instead."""
    inside = set().union(*(ancestors(new) for new in new_inputs))
    new_nodes = {key(new.get_node()) for new in new_inputs}
    for node in _upstream_nodes(scores):
        if node.get_type_name() == "ShapeOf" and key(node) not in inside \
                and _reads_batch_only(node) \
                and not new_nodes & ancestors(node.input_value(0)):
            node.input(0).replace_source_output(new_inputs[0])
    for node in _upstream_nodes(scores):
        if node.get_type_name() != "Reshape" or key(node) in inside:
            continue
        if node.input_value(1).get_node().get_type_name() == "Constant":
            continue
        dims = static_dims(node.output(0))
        if dims and dims[0] is None and all(d is not None for d in dims[1:]):
            node.input(1).replace_source_output(const([-1] + dims[1:]).output(0))


def shape_indices(node: ov.Node) -> list[int] | None:
    """The dimensions a Gather of constant indices on axis 0 reads from a ShapeOf (`x.shape[i]`
    in the model's code); None for any other node."""
    if node.get_type_name() != "Gather" \
            or node.input_value(0).get_node().get_type_name() != "ShapeOf":
        return None
    indices, axis = constant_value(node.input_value(1)), constant_value(node.input_value(2))
    if indices is None or axis is None or int(np.ravel(axis)[0]) != 0:
        return None
    return [int(i) for i in np.ravel(indices)]


def _reads_batch_only(shape_of: ov.Node) -> bool:
    """Whether every use of a ShapeOf takes element 0 only (a Gather of index 0 on axis 0)."""
    consumers = [i.get_node() for i in shape_of.output(0).get_target_inputs()]
    return bool(consumers) and all(shape_indices(node) == [0] for node in consumers)


_GLOBAL_POOL_TYPES = {"ReduceMean", "AvgPool", "AdaptiveAvgPool", "ReduceMax", "MaxPool",
                      "AdaptiveMaxPool"}


MAP_LAYOUTS = ("NCHW", "NHWC")  # 4-D feature maps, what CNNs (and Swin) pool


def global_pool_layout(node: ov.Node) -> str | None:
    """"NCHW" for an op that pools a 4-D [N, C, h, w] map over all of h and w, "NHWC" for a
    mean or max over axes 1 and 2 of [N, h, w, C] (Swin's head), "tokens" for a mean or max
    over axis 1 of [N, h*w, C] whose h*w tokens make a square grid (LeViT's head),
    "channels_tokens" for one over axis 2 of [N, C, h*w] (`x.flatten(2).mean(-1)`: SwiftFormer;
    transformers' Swin V2 pools its tokens so; `find_global_pool` also asks that every value
    pass through it, as a norm's statistics do not), else None."""
    kind = node.get_type_name()
    if kind not in _GLOBAL_POOL_TYPES:
        return None
    src = node.input_value(0)
    rank = src.get_partial_shape().rank
    if rank.is_dynamic or rank.get_length() not in (3, 4):
        return None
    if kind.startswith("Reduce"):
        axes_node = node.input_value(1).get_node()
        if axes_node.get_type_name() != "Constant":
            return None
        axes = frozenset(int(a) % rank.get_length() for a in np.ravel(axes_node.get_data()))
        if rank.get_length() == 3:
            if axes not in ({1}, {2}):
                return None
            tokens = static_dims(src)[min(axes)]
            square = tokens is not None and tokens >= 4 and math.isqrt(tokens) ** 2 == tokens
            return None if not square else "tokens" if axes == {1} else "channels_tokens"
        return {frozenset({2, 3}): "NCHW", frozenset({1, 2}): "NHWC"}.get(axes)
    if rank.get_length() != 4:
        return None
    out = static_dims(node.output(0))
    return "NCHW" if len(out) == 4 and out[2] == 1 and out[3] == 1 else None


def find_global_pool(scores: ov.Output, layouts: tuple[str, ...] = MAP_LAYOUTS
                     ) -> ov.Node | None:
    """The global pooling (of one of `layouts`) closest to the scores on their path (the
    head's entry)."""
    best, best_depth = None, None
    depth: dict[str, int] = {key(scores.get_node()): 0}
    queue = [scores.get_node()]
    while queue:
        node = queue.pop(0)
        d = depth[key(node)]
        layout = global_pool_layout(node)
        if layout in layouts and (best_depth is None or d < best_depth) \
                and (layout != "channels_tokens" or is_bottleneck(node, scores)):
            best, best_depth = node, d
        for v in node.input_values():
            parent = v.get_node()
            if key(parent) not in depth:
                depth[key(parent)] = d + 1
                queue.append(parent)
    return best


def find_last_transformer_block_input(model: ov.Model, scores: ov.Output) -> ov.Output | None:
    """Input of the last transformer block: the residual stream that feeds that block's first
    LayerNorm (MVN) and its residual Add. Counting back from the scores, the final norm is the
    last MVN and the last block holds the two before it. The final norm normalises tokens
    [N, T, D], or the pooled vector [N, D] where the head averages the tokens first (timm's
    `fc_norm`: counting token norms only took the block before the last there)."""
    on_path = ancestors(scores)
    norms = [n for n in model.get_ordered_ops() if n.get_type_name() == "MVN"
             and key(n) in on_path and n.input_value(0).get_partial_shape().rank.is_static]
    ranks = [n.input_value(0).get_partial_shape().rank.get_length() for n in norms]
    pooled_norm = norms[-1:] if ranks[-1:] == [2] else []
    norms = [n for n, rank in zip(norms, ranks) if rank == 3] + pooled_norm
    if len(norms) < 3:
        return None
    stream = norms[-3].input_value(0)
    consumers = {i.get_node().get_type_name() for i in stream.get_target_inputs()}
    if "Add" not in consumers:
        return None
    return stream


def block_norm_output(stream: ov.Output) -> ov.Output | None:
    """The output of the LayerNorm that opens the block reading `stream`: its MVN and the
    scale and shift that follow (absent where they were 1 and 0 and conversion folded them);
    None where the stream feeds no single MVN."""
    norms = [i.get_node() for i in stream.get_target_inputs()
             if i.get_node().get_type_name() == "MVN"]
    if len(norms) != 1:
        return None
    output = norms[0].output(0)
    while True:
        consumers = list(output.get_target_inputs())
        if len(consumers) != 1:
            return output
        node = consumers[0].get_node()
        others = [v for v in node.input_values() if key(v.get_node()) != key(output.get_node())]
        if node.get_type_name() not in {"Multiply", "Add"} or len(others) != 1 \
                or constant_value(others[0]) is None:
            return output
        output = node.output(0)


@dataclass
class LinearHead:
    """A head that is one linear layer after pooling: scores = pooled @ W (+ bias)."""

    weight: ov.Output
    weight_is_kc: bool  # stored [K, C] (MatMul transpose_b) rather than [C, K]
    bias: ov.Output | None


_DECOMPRESSION = {"Convert": lambda a: a, "Multiply": np.multiply, "Subtract": np.subtract}


def constant_value(output: ov.Output) -> np.ndarray | None:
    """The f32 values of a Constant, possibly through the Convert / Subtract / Multiply that
    decompress weights stored in f16 or int8; None for anything computed from the input."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return np.asarray(node.get_data()).astype(np.float32)
    if kind not in _DECOMPRESSION:
        return None
    inputs = [constant_value(v) for v in node.input_values()]
    if any(v is None for v in inputs):
        return None
    return _DECOMPRESSION[kind](*inputs).astype(np.float32)


def activation_range(output: ov.Output) -> tuple[float, float] | None:
    """The range the graph guarantees for a tensor: a Clamp's bounds (ReLU6, hard-tanh), or a
    per-tensor FakeQuantize's output range (the activations of a model trained for INT8, whose
    quantiser took the Clamp's place); None when the values are unbounded (ReLU, SiLU, ...)."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Clamp":
        attrs = node.get_attributes()
        return float(attrs["min"]), float(attrs["max"])
    if kind == "FakeQuantize":
        low, high = (constant_value(node.input_value(i)) for i in (3, 4))
        if low is not None and high is not None and low.size == high.size == 1:
            return float(low.item()), float(high.item())
    return None


def quantized_8bit(output: ov.Output) -> bool:
    """Whether a tensor already comes out of an 8-bit (at most 256 levels) FakeQuantize."""
    node = output.get_node()
    return node.get_type_name() == "FakeQuantize" and node.get_attributes()["levels"] <= 256


def linear_head(pool: ov.Node, scores: ov.Output) -> LinearHead | None:
    """Match pool -> (Reshape | Squeeze)* -> MatMul(x, const W) -> [Add(const b)] == scores."""
    current = pool.output(0)
    while True:
        users = [i.get_node() for i in current.get_target_inputs()]
        if len(users) != 1:
            return None
        node = users[0]
        if node.get_type_name() in {"Reshape", "Squeeze"}:
            current = node.output(0)
            continue
        break
    if node.get_type_name() != "MatMul" or constant_value(node.input_value(1)) is None:
        return None
    attrs = node.get_attributes()
    if attrs.get("transpose_a"):
        return None
    matmul_out = node.output(0)
    if static_dims(matmul_out)[1:] != static_dims(scores)[1:] or len(static_dims(matmul_out)) != 2:
        return None
    bias = None
    if key(node) != key(scores.get_node()):
        users = [i.get_node() for i in matmul_out.get_target_inputs()]
        if len(users) != 1 or users[0].get_type_name() != "Add" \
                or key(users[0]) != key(scores.get_node()):
            return None
        other = [v for v in users[0].input_values() if key(v.get_node()) != key(node)]
        if len(other) != 1 or constant_value(other[0]) is None:
            return None
        bias = other[0]
    return LinearHead(node.input_value(1), bool(attrs.get("transpose_b")), bias)
