"""Per-layer counters of a compiled model: where one inference's time goes, by layer type, by
kernel, and by the precision each layer ran in (OpenVINO's PERF_COUNT, the figures behind
benchmark_app's `-pc`).

Why a model is as fast as it is is read here rather than guessed: an INT8 IR's pointwise
convolutions may run hardly faster than bf16 ones on an AMX CPU (benchmarks/INT8.md), layers the
precision pins keep in f32 show as f32, and reorders between precisions show as reorders. The
counters are taken on one infer request called back to back, so they describe the inference
alone, not the throughput of the points around them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from .images import resize_for_model
from .model import read_ir, with_batch
from .model_info import ModelInfo

SLOWEST = 10  # layers listed one by one


@dataclass(frozen=True)
class LayerTime:
    """One executed layer of the device's runtime graph, its mean time per inference."""

    name: str
    layer_type: str  # the runtime graph's type: Convolution, GroupConvolution, Reorder, ...
    kernel: str  # the implementation, e.g. brgconv_avx512_amx_1x1_bf16
    precision: str  # what the layer computed in: f32, bf16, f16, u8, i8, ...
    mean_us: float


@dataclass(frozen=True)
class LayerGroup:
    """Layers of one type, kernel and precision together."""

    layer_type: str
    kernel: str
    precision: str
    count: int
    total_us: float  # per inference
    share: float  # of the inference's summed layer time


@dataclass
class LayerProfile:
    """The counters of one IR under one compile configuration and batch size."""

    model: str
    device: str
    precision: str  # as asked (INFERENCE_PRECISION_HINT or "default")
    hint: str
    streams: str
    batch: int
    iterations: int
    total_us: float  # summed layer time per inference
    layer_count: int
    by_type: dict[str, float] = field(default_factory=dict)  # share per layer type
    by_precision: dict[str, float] = field(default_factory=dict)  # share per precision
    groups: list[LayerGroup] = field(default_factory=list)
    slowest: list[LayerTime] = field(default_factory=list)
    layers: list[LayerTime] = field(default_factory=list)  # every one, in execution order


def group_layers(layers: Iterable[LayerTime]) -> list[LayerGroup]:
    """Layers summed by (type, kernel, precision), the most expensive group first."""
    layers = list(layers)
    total = sum(layer.mean_us for layer in layers) or 1.0
    sums: dict[tuple[str, str, str], list[float]] = {}
    for layer in layers:
        sums.setdefault((layer.layer_type, layer.kernel, layer.precision), []).append(
            layer.mean_us)
    groups = [LayerGroup(t, k, p, len(v), float(sum(v)), float(sum(v)) / total)
              for (t, k, p), v in sums.items()]
    return sorted(groups, key=lambda g: -g.total_us)


def shares(layers: Iterable[LayerTime], key: str) -> dict[str, float]:
    """Each value of a LayerTime attribute (`layer_type`, `precision`) with its share of the
    summed time, largest first."""
    layers = list(layers)
    total = sum(layer.mean_us for layer in layers) or 1.0
    out: dict[str, float] = {}
    for layer in layers:
        value = getattr(layer, key)
        out[value] = out.get(value, 0.0) + layer.mean_us / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class RuntimeLayer:
    """One layer of the graph a device built from an IR (its runtime model)."""

    name: str
    layer_type: str  # Convolution, GroupConvolution, Reorder, Subgraph, ...
    precision: str  # what the device computes it in (runtimePrecision): f32, bf16, u8, ...
    original_names: frozenset[str]  # the IR operations it computes (fused ones included)


def runtime_layers(compiled: ov.CompiledModel) -> list[RuntimeLayer]:
    """The device's runtime graph in execution order: what runs, in which precision."""
    def text(info, key: str) -> str:
        return str(info[key].astype(str)) if key in info else ""

    layers = []
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        layers.append(RuntimeLayer(node.get_friendly_name(), text(info, "layerType"),
                                   text(info, "runtimePrecision"),
                                   frozenset(text(info, "originalLayersNames").split(","))))
    return layers


def model_input(model: ov.Model, batch: int, image: np.ndarray | None) -> np.ndarray:
    """The IR's input for `batch` copies of an RGB image: resized the way the server does it
    where the IR carries xaiserve's model_info, zeros of the input's shape otherwise."""
    info = ModelInfo.from_model(model)
    if image is not None and info is not None and info.embedded_processing:
        return np.repeat(resize_for_model(image, info)[None], batch, axis=0)
    port = model.inputs[0]
    shape = [batch] + [d.get_length() for d in list(port.get_partial_shape())[1:]]
    return np.zeros(shape, port.get_element_type().to_dtype())


def measure_layers(core: ov.Core, xml: Path, device: str, config: dict[str, str], batch: int,
                   image: np.ndarray | None = None, iterations: int = 100,
                   warmup: int = 10) -> list[LayerTime]:
    """Compile `xml` with PERF_COUNT for `batch` images and average every executed layer's
    time over `iterations` inferences of one request; the layers in the order they first ran.
    ValueError where the IR's batch is fixed to another size."""
    model = read_ir(core, xml)
    batch_dim = model.inputs[0].get_partial_shape()[0]
    if batch_dim.is_static and batch_dim.get_length() != batch:
        raise ValueError(f"the IR's batch is fixed at {batch_dim.get_length()}")
    if batch_dim.is_dynamic:
        model = with_batch(model, batch)
    compiled = core.compile_model(model, device, {**config, "PERF_COUNT": True})
    precisions = {layer.name: layer.precision for layer in runtime_layers(compiled)
                  if layer.precision}
    request = compiled.create_infer_request()
    inputs = {0: model_input(model, batch, image)}
    for _ in range(warmup):
        request.infer(inputs)
    totals: dict[str, float] = {}
    seen: dict[str, tuple[str, str]] = {}
    for _ in range(iterations):
        request.infer(inputs)
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            totals[info.node_name] = totals.get(info.node_name, 0.0) + \
                info.real_time.total_seconds() * 1e6
            seen[info.node_name] = (info.node_type, info.exec_type)
    return [LayerTime(name, seen[name][0], seen[name][1],
                      precisions.get(name, kernel_precision(seen[name][1])), total / iterations)
            for name, total in totals.items()]


def kernel_precision(kernel: str) -> str:
    """The precision a kernel name ends with (brgconv_avx512_amx_1x1_bf16 -> bf16), for layers
    the runtime graph does not list. Only a fallback: the CPU plugin names u8 kernels "_I8",
    so the runtime graph's runtimePrecision comes first."""
    return kernel.rsplit("_", 1)[-1].lower() if "_" in kernel else "unknown"


def profile(layers: list[LayerTime], **labels) -> LayerProfile:
    """The counters summarised: `labels` are LayerProfile's model, device, precision, hint,
    streams, batch and iterations."""
    return LayerProfile(**labels, total_us=float(sum(layer.mean_us for layer in layers)),
                        layer_count=len(layers), by_type=shares(layers, "layer_type"),
                        by_precision=shares(layers, "precision"), groups=group_layers(layers),
                        slowest=sorted(layers, key=lambda layer: -layer.mean_us)[:SLOWEST],
                        layers=list(layers))


def times(prof: LayerProfile, by: str = "by_type") -> dict[str, float]:
    """us per inference for each layer type (`by_type`) or precision (`by_precision`)."""
    return {name: share * prof.total_us for name, share in getattr(prof, by).items()}


def relative_times(prof: LayerProfile, base: LayerProfile) -> dict[str, float]:
    """`prof`'s time over `base`'s: "total", then each layer type both ran, largest in `base`
    first (an INT8 IR against its f32 IR under one configuration: where INT8 gains)."""
    ours, theirs = times(prof), times(base)
    ratios = {"total": prof.total_us / base.total_us if base.total_us else float("nan")}
    for name, base_us in sorted(theirs.items(), key=lambda kv: -kv[1]):
        if name in ours and base_us > 0:
            ratios[name] = ours[name] / base_us
    return ratios

