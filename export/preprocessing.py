"""Embed the input conversion into the graph: u8 NHWC RGB images in, the model's float NCHW
normalised tensor inside (OpenVINO PrePostProcessor), so clients send plain pixels."""

from __future__ import annotations

import openvino as ov
from openvino.preprocess import PrePostProcessor

from xaiserve.service.model_info import ModelInfo

INPUT_NAME = "image"
SCORES_NAME = "logits"


def embed_preprocessing(model: ov.Model, info: ModelInfo, layout: str = "NCHW",
                        bgr: bool = False) -> ov.Model:
    """`layout`: the model's own input layout (NHWC for a Keras model converted to ONNX);
    `bgr`: the model takes BGR, so the RGB input's channels are swapped after the mean and
    scale (which stay in R, G, B order, as the card records them)."""
    ppp = PrePostProcessor(model)
    source = ppp.input(0)
    source.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    steps = source.preprocess()
    # NCHW before the mean: the same numbers as normalising in NHWC, and in an INT8 IR the
    # input's quantiser then fuses into a planar eltwise. Normalised in NHWC, the CPU plugin
    # (2026.4, AMX Xeon) ran mean, scale and quantiser as one 3-channel NHWC eltwise (166 us
    # in its per-layer counters against 19 us); the default model's INT8 IR went from 0.913
    # to 0.895 of the bf16 IR's batch-1 p50. f32 IRs compute the same bits either way.
    if layout == "NCHW":
        steps.convert_layout(ov.Layout("NCHW"))
    steps.convert_element_type(ov.Type.f32)
    if any(m != 0 for m in info.mean_values):
        steps.mean(list(info.mean_values))
    if any(s != 1 for s in info.scale_values):
        steps.scale(list(info.scale_values))
    if bgr:
        steps.reverse_channels()
    source.model().set_layout(ov.Layout(layout))
    model = ppp.build()
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    scores = next(o for o in model.outputs if "saliency_map" not in o.get_names())
    scores.get_tensor().add_names({SCORES_NAME})
    info.embedded_processing = True
    return model
