"""Operations an IR asks every device to compute in f32, whatever its default precision.

OpenVINO runs f32 IRs in bf16 on CPUs with AMX and in f16 on GPUs unless told otherwise, and an
operation whose runtime attribute `DisablePrecisionConversion` lists those precisions keeps its
f32 inputs and outputs instead (the CPU plugin reads it when it builds its graph; OpenVINO's
f32-to-f16 conversion, which the GPU plugin runs, reads the same mark: not measured here, where
there is no GPU). Putting the attribute into the IR makes
`--keep-f32-first` mean what it says on every device, with no serving setting: without it the
layers INT8 left "in f32" ran in bf16 on AMX, as did everything in an f32 IR.

Measured on the default model (this project's AMX Xeon, 2 vCPUs; top-1 agreement with the IR
computed in f32 on 300 crops of the seed-1 photos / 300 of the held-out ones; batch-1 p50
against the plain IR in bf16, interleaved rounds of benchmarks/int8_on_host.py; the first N
convolutions and every operation before them pinned): none 0.933 / 0.953 at 1; N = 3: 0.970 /
0.977 at 1.05; 6: 0.977 / 0.987 at 1.09; 9: 0.983 / 0.983 at 1.14; 24: 0.987 / 0.983 at 1.24;
the whole IR in f32 1 at 1.60. The classifier head was no lever: the CPU plugin already keeps
the graph's tail after the last matrix product in f32.

Pin whole regions, not single layers: with only the convolutions of a residual block pinned,
the 2026.4 CPU plugin failed at the first inference ("Convolution node ... is not initialized",
a convolution fused with a bf16 residual sum), so `leading_scope` gives every operation before
the cut. Python cannot build the attribute, so the IR is written, the attribute added to its
XML, and the IR read back; the arithmetic is unchanged where the default is f32.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openvino as ov

from .reduced_precision import WEIGHTED_TYPES
from .saliency.graph import ancestors, find_by_name, key

ATTRIBUTE = "DisablePrecisionConversion"
# its value: "from:to,to" (dynamic = any source type); the reduced precisions devices default to
KEEP_F32 = {"name": ATTRIBUTE, "version": "0", "value": "dynamic:f16,bf16"}
NOT_COMPUTED = {"Parameter", "Result", "Constant"}


class PinError(ValueError):
    """A bad --keep-f32-first; the message names the option and the fix."""


def check_keep_f32_first(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise PinError(f"--keep-f32-first {fraction}: a fraction in [0, 1) (0.25 keeps the "
                       "first quarter of the backbone's layers in f32)")


def backbone_ops(model: ov.Model, target_layer: str | None) -> list[ov.Node]:
    """The operations up to the saliency target map, in graph order (all without a branch)."""
    if target_layer is None:
        return list(model.get_ordered_ops())
    backbone = ancestors(find_by_name(model, target_layer))
    return [n for n in model.get_ordered_ops() if key(n) in backbone]


def leading_scope(model: ov.Model, target_layer: str | None, fraction: float) -> list[str]:
    """Friendly names of the operations before the backbone's weighted layer (convolution or
    matrix product) `fraction` of the way through it: `--keep-f32-first`, kept in f32.

    The first layers are where INT8 costs the most top-1 agreement. On the default model (300
    validation crops, benchmarks/int8_speed.py --keep-f32-first 0.25 0.5), against f32:
    all INT8 0.903 at 0.59 of the latency; the first quarter in f32 0.943 at 0.71; the first
    half 0.950 at 0.78. Keeping the *last* half in f32 instead reached only 0.917. They are
    where bf16 costs the most too (the figures above)."""
    if fraction <= 0:
        return []
    ops = [n for n in backbone_ops(model, target_layer)
           if n.get_type_name() not in NOT_COMPUTED]
    weighted = [i for i, n in enumerate(ops) if n.get_type_name() in WEIGHTED_TYPES]
    if not weighted:
        return []
    cut = weighted[min(len(weighted) - 1, int(len(weighted) * fraction))]
    return [n.get_friendly_name() for n in ops[:cut]]


def pin_first_layers(model: ov.Model, target_layer: str | None, fraction: float) -> ov.Model:
    """`--keep-f32-first`: the backbone's leading operations computed in f32 on every device."""
    return keep_in_f32(model, leading_scope(model, target_layer, fraction))


def keep_in_f32(model: ov.Model, names: list[str]) -> ov.Model:
    """`model` with the operations of these friendly names pinned to f32 (a new model: the
    attribute only exists in OpenVINO's C++ objects, which reading an IR creates)."""
    if not names:
        return model
    wanted = set(names)
    with tempfile.TemporaryDirectory(prefix="xaiserve-pins-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        tree = ET.parse(xml)
        found = set()
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in wanted:
                rt_info = layer.find("rt_info")
                if rt_info is None:
                    rt_info = ET.Element("rt_info")
                    layer.insert(1 if layer.find("data") is not None else 0, rt_info)
                # an IR exported with pins carries them already, and the reader takes one
                if not any(a.get("name") == ATTRIBUTE for a in rt_info.iter("attribute")):
                    ET.SubElement(rt_info, "attribute", KEEP_F32)
                found.add(layer.get("name"))
        if found != wanted:
            raise ValueError(f"no layer named {sorted(wanted - found)[:3]} in the IR")
        weights = ov.Tensor(np.fromfile(xml.with_suffix(".bin"), np.uint8))
        return ov.Core().read_model(ET.tostring(tree.getroot(), encoding="unicode"), weights)


def kept_in_f32(model: ov.Model) -> list[str]:
    """Friendly names of the operations pinned to f32, in graph order."""
    mark = f"{ATTRIBUTE}_0"  # the rt_info key: the attribute's type name and version
    return [n.get_friendly_name() for n in model.get_ordered_ops() if mark in n.get_rt_info()]
