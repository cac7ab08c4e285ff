"""The export step: source -> saliency insertion -> embedded preprocessing -> repository."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov

from xaiserve.service import json_values
from xaiserve.service.model_info import ModelInfo
from xaiserve.service.version_files import CARD_NAME, digests

from .int8 import Int8Settings, quantize_export
from .int8_finetune import TorchSource
from .parity import compile_f32, parity, source_logits
from .precision_pins import kept_in_f32, pin_first_layers
from .preprocessing import embed_preprocessing
from .reference_saliency import ReferenceCheck, check_reference
from .repository import staged_version
from .saliency import Insertion, SaliencySettings, insert_saliency
from .sources import SourceOptions, convert_torch, create_source, synthetic_images


@dataclass
class ExportRequest:
    source: str
    repository: Path
    name: str
    version: int | None = None
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    source_options: SourceOptions = field(default_factory=SourceOptions)
    parity_images: np.ndarray | None = None  # u8 [n, H, W, 3] at the model's size
    reference: ReferenceCheck | None = None  # torch reference maps vs the IR's, optional gate
    int8: Int8Settings | None = None  # quantise after the f32 checks (export/int8.py)
    # the backbone's first layers computed in f32 on every device (precision_pins.py); with
    # int8, Int8Settings.keep_f32_first, which also leaves them out of INT8, applies instead
    keep_f32_first: float = 0.0


@dataclass
class ExportResult:
    path: Path  # the version directory
    version: int
    card: dict


Progress = Callable[[str], None]


def export_model(request: ExportRequest, progress: Progress = lambda _: None) -> ExportResult:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress("loading the source")
    loaded = create_source(request.source, request.source_options)
    timings["load_and_convert_s"] = time.perf_counter() - t

    t = time.perf_counter()
    progress("inserting saliency")
    info = loaded.info
    model, insertion = _served_form(loaded.model, request.saliency, info,
                                    loaded.preprocessing_embedded, loaded.input_layout,
                                    loaded.bgr)
    timings["insert_s"] = time.perf_counter() - t

    parity_figures = None
    if loaded.torch_module is not None or loaded.source_model is not None:
        t = time.perf_counter()
        progress("checking parity against the source")
        images = request.parity_images
        if images is None:
            images = synthetic_images(4, info.input_height)
        parity_figures = parity(source_logits(loaded, images), compile_f32(model), images)
        timings["parity_s"] = time.perf_counter() - t
    reference_figures = _reference(request, loaded, model, info, images if parity_figures
                                   else None, progress, timings)

    int8_figures = None
    target_layer = insertion.target_layer if insertion else None
    keep_f32_first = request.int8.keep_f32_first if request.int8 else request.keep_f32_first
    if request.int8 is not None:  # raises GateFailed before anything is written
        t = time.perf_counter()
        model, int8_figures = quantize_export(
            model, target_layer, info, request.int8, progress,
            torch_source=torch_source(loaded, request.saliency, info))
        timings["int8_s"] = time.perf_counter() - t
    else:
        model = pin_first_layers(model, target_layer, keep_f32_first)
    pinned = kept_in_f32(model)

    with staged_version(request.repository, request.name, request.version,
                        size_hint=ir_bytes(model)) as (staging, version):
        t = time.perf_counter()
        progress("writing the IR")
        ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
        (staging / "labels.txt").write_text("\n".join(info.labels) + "\n")
        files = digests(staging, ("model.xml", "model.bin", "labels.txt"))
        timings["save_s"] = time.perf_counter() - t
        card = {
            "name": request.name,
            "version": version,
            "source": loaded.description,
            "openvino": ov.get_version(),
            "input": {"name": "image", "shape": [-1, info.input_height, info.input_width, 3],
                      "dtype": "u8", "layout": "NHWC", "color": "RGB"},
            "preprocessing": {"mean_values": info.mean_values, "scale_values": info.scale_values,
                              "resize_type": info.resize_type, "embedded": True,
                              "reversed_channels": loaded.bgr},
            "labels_file": "labels.txt",
            "num_classes": len(info.labels),
            "outputs": [{"name": "saliency_map" if "saliency_map" in o.get_names() else "logits",
                         "shape": str(o.get_partial_shape())} for o in model.outputs],
            "saliency": None if insertion is None else {
                "method": insertion.method,
                "target_layer": info.saliency_target_layer,  # the INT8 IR's, when trained
                "feature_shape": insertion.feature_shape,
                "map_shape": insertion.map_shape,
                "map_precision": info.saliency_map_precision,  # the served IR's, too
                "settings": request.saliency.as_dict(),
            },
            "parity": parity_figures,
            "reference": reference_figures,
            "precision": "int8" if int8_figures else "f32",
            "kept_in_f32": {
                "what": "operations computed in f32 on every device, also where the default "
                        "precision is bf16 (AMX CPUs) or f16 (GPUs): --keep-f32-first, and "
                        "those an IR source had pinned already",
                "fraction": keep_f32_first or None,
                "operations": len(pinned),
            } if pinned else None,
            "int8": int8_figures,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            # the server loads the version only when its files match (a copy caught half-way)
            "files": files,
        }
        (staging / CARD_NAME).write_text(json_values.dumps(card, indent=2) + "\n")
    return ExportResult(Path(request.repository) / request.name / str(version), version, card)


def ir_bytes(model: ov.Model) -> int:
    """About what the IR takes on disk: its constants (model.bin) and a MiB for the rest."""
    return sum(op.get_byte_size() for op in model.get_ordered_ops()
               if op.get_type_name() == "Constant") + 2**20


def _served_form(model: ov.Model, saliency: SaliencySettings, info: ModelInfo,
                 preprocessing_embedded: bool, input_layout: str = "NCHW",
                 bgr: bool = False) -> tuple[ov.Model, Insertion | None]:
    """The model as the repository stores it: a saliency output and u8 NHWC input; `info`
    records the insertion and is written into the model."""
    model, insertion = insert_saliency(model, saliency)
    if insertion is not None:
        info.saliency_method = insertion.method
        info.saliency_target_layer = insertion.target_layer
        info.saliency_settings = json.dumps(saliency.as_dict(), sort_keys=True)
        info.saliency_map_precision = insertion.map_precision
    if not preprocessing_embedded:
        model = embed_preprocessing(model, info, input_layout, bgr)
    info.write(model)
    return model, insertion


def torch_source(loaded, saliency: SaliencySettings, info: ModelInfo) -> TorchSource | None:
    """What `--finetune-steps` trains, and how a trained module becomes the served IR."""
    if loaded.torch_module is None or loaded.scripted:
        return None

    def build_ir(module) -> tuple[ov.Model, str | None]:
        model, insertion = _served_form(convert_torch(module, info.input_height), saliency,
                                        info, preprocessing_embedded=False)
        return model, insertion.target_layer if insertion else None

    return TorchSource(loaded.torch_module, build_ir)


def _reference(request: ExportRequest, loaded, model: ov.Model, info, images,
               progress: Progress, timings: dict) -> dict | None:
    """Torch reference maps against the IR's (before anything is written, so a failed gate
    leaves the repository as it was)."""
    if request.reference is None:
        return None
    from .reference_saliency import ReferenceCheckError

    if loaded.torch_module is None:
        raise ReferenceCheckError("--reference needs a torch source (default, timm:..., "
                                  "torch:...); a model file (IR, ONNX, ...) has no gradients")
    if loaded.scripted and request.reference.method == "gradcam":
        raise ReferenceCheckError("--reference gradcam: a TorchScript module takes no forward "
                                  "hooks; use --reference gradient, or export it from its code "
                                  "(torch:<module>:<callable> with --checkpoint)")
    t = time.perf_counter()
    progress("comparing with the torch reference")
    figures = check_reference(loaded.torch_module, compile_f32(model), images, info,
                              request.reference)
    timings["reference_s"] = time.perf_counter() - t
    return figures
