"""bf16 and f16 arithmetic, emulated on a CPU that has neither.

AMX CPUs infer in bf16 by default and GPUs in f16: their convolutions and matrix products take
inputs rounded to 8 (bf16) or 11 (f16) significant bits and sum in f32. Rounding each such
layer's inputs to that many bits in f32 computes the same on any CPU, so the INT8 report can
say how many top-1 classes those devices' default precision already changes on the validation
images: a yardstick for `--max-top1-drop`.

The rounding is Veltkamp's split, `c = x * (2**(24 - bits) + 1); c - (c - x)`, in plain f32
operations: the CPU plugin removes a Convert(f32 -> bf16 -> f32) pair on activations, and
folds it on constants without rounding to nearest (measured on OpenVINO 2026). Not emulated:
f16's narrower range, and the bf16 storage of other operations' outputs (additions,
activations), which the next layer's input rounding mostly absorbs.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13 as ops

WEIGHTED_TYPES = frozenset({"Convolution", "GroupConvolution", "MatMul"})
SIGNIFICANT_BITS = {"bf16": 8, "f16": 11}  # f32 has 24


def rounded(value: ov.Output, bits: int) -> ov.Node:
    """`value` (f32) rounded to the nearest number of `bits` significant bits, in f32 (exact
    for magnitudes below 2**(128 - 25 + bits), where the scaled value still fits)."""
    splitter = ops.constant(np.float32(2 ** (24 - bits) + 1))
    scaled = ops.multiply(value, splitter)
    return ops.subtract(scaled, ops.subtract(scaled, value))


def with_rounded_inputs(model: ov.Model, precision: str) -> ov.Model:
    """A copy of `model` whose convolutions and matrix products see their f32 inputs
    (activations and weights) rounded as `precision` ("bf16" or "f16") would hold them;
    `model` is unchanged."""
    bits = SIGNIFICANT_BITS[precision]
    copy = model.clone()
    for node in copy.get_ordered_ops():
        if node.get_type_name() not in WEIGHTED_TYPES:
            continue
        for port in node.inputs():
            source = port.get_source_output()
            if source.get_element_type() == ov.Type.f32:
                port.replace_source_output(rounded(source, bits).output(0))
    copy.validate_nodes_and_infer_types()
    return copy
