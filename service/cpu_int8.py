"""Whether this CPU's 8-bit dot products saturate, which decides NNCF's overflow fix.

CPUs without VNNI (Intel before Cascade Lake, AMD before Zen 4) multiply INT8 weights by u8
activations with VPMADDUBSW, whose pairwise sums saturate at 16 bits; OpenVINO documents the
accuracy loss this causes on MobileNet-like models ("Saturation (overflow) issue"). NNCF's fix
stores weights in 7 bits, which stops the saturation there but costs precision on CPUs with VNNI
(and on GPUs, NPUs), which sum exactly. Measured on the default model (300 validation crops,
top-1 agreement with f32):

| weights | on AVX2 (AMD EPYC, no VNNI) | without saturation (VNNI-like arithmetic) |
| --- | --- | --- |
| 8 bits but the first layer (NNCF's default) | 0.790 | 0.903 |
| 7 bits everywhere (`enable`) | 0.860 | 0.853 |

So neither is right everywhere: `auto` picks by the CPU the export runs on, which is also the CPU
that validates the INT8 IR against f32. The server warns when it loads, on such a CPU, an IR
whose INT8 weights use all 8 bits (`saturating_layers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# where the CPU plugin sums u8 x s8 products pairwise (depthwise convolutions do not: NNCF
# leaves their weights at 8 bits even with the fix)
PAIRWISE_SUMMED = frozenset({"Convolution", "MatMul"})
DECOMPRESSION = frozenset({"Convert", "Multiply", "Subtract", "Reshape", "Transpose"})
SEVEN_BIT_LIMIT = 64  # NNCF's 7-bit weights lie in [-63, 64]
# compile settings that compute an INT8 IR exactly, as a CPU with VNNI sums it: the CPU plugin's
# internal LP_TRANSFORMS_MODE=NO runs the FakeQuantize operations in f32 instead of INT8 kernels
# (for the benchmarks' "without saturation" figures)
EXACT_INT8_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": "NO"}
# the export's --overflow-fix choices -> nncf.OverflowFix values
OVERFLOW_FIXES = {"enable": "enable", "first-layer": "first_layer_only", "disable": "disable"}


def _cpuinfo_field(field: str, cpuinfo: Path) -> str | None:
    """The first processor's value of a /proc/cpuinfo field; None where there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags; None where the system does not say (not Linux)."""
    flags = _cpuinfo_field("flags", cpuinfo)
    return None if flags is None else frozenset(flags.split())


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    return _cpuinfo_field("model name", cpuinfo) or "unknown"


def int8_dot_product(flags: frozenset[str] | None) -> str:
    """"vnni" (exact 32-bit sums), "saturating" (16-bit pairwise sums), or "unknown"."""
    if flags is None:
        return "unknown"
    return "vnni" if flags & VNNI_FLAGS else "saturating"


def resolve_overflow_fix(requested: str, flags: frozenset[str] | None) -> str:
    """The --overflow-fix to apply: `auto` is `enable` unless the CPU is known to have VNNI."""
    if requested != "auto":
        return requested
    return "first-layer" if int8_dot_product(flags) == "vnni" else "enable"


def int8_weights(node: ov.Node) -> np.ndarray | None:
    """The INT8 constant behind an operation's weights input (through the Convert and Multiply
    that decompress it), or None where the weights are not stored as INT8."""
    weights = node.input_value(1).get_node()
    while weights.get_type_name() in DECOMPRESSION:
        weights = weights.input_value(0).get_node()
    if weights.get_type_name() == "Constant" and weights.get_element_type() == ov.Type.i8:
        return weights.get_data()
    return None


def saturating_layers(model: ov.Model) -> list[str]:
    """Friendly names of the convolutions and matrix products whose INT8 weights use more than
    7 bits: on a CPU without VNNI their sums can saturate. Empty for a float model. The server
    passes the graph without its saliency branch (service.model.without_saliency): the branch's
    own int8 map product moves no class score (README, "Which CPU computes the INT8 model")."""
    names = []
    for node in model.get_ordered_ops():
        if node.get_type_name() in PAIRWISE_SUMMED:
            weights = int8_weights(node)
            if weights is not None and np.abs(weights.astype(np.int16)).max() > SEVEN_BIT_LIMIT:
                names.append(node.get_friendly_name())
    return names


def saturation_warning(layers: list[str], dot_product: str, device: str) -> str | None:
    """What to tell the operator when an IR with 8-bit INT8 weights runs on a CPU whose INT8
    sums saturate (the default model exported that way: top-1 agreement with f32 0.79 on such
    a CPU against 0.90 with VNNI); None when there is nothing to say."""
    on_cpu = "CPU" in device.upper() or device.upper() == "AUTO"
    if not layers or dot_product != "saturating" or not on_cpu:
        return None
    return (f"{len(layers)} layers (first: {layers[0]}) have 8-bit INT8 weights and this CPU "
            f"({cpu_name()}) has no VNNI, so their sums can saturate and accuracy drops; "
            "re-export with `xaiserve export --int8 --overflow-fix enable`")
