"""Parity of the exported IR against its source (a torch module, or the model file as read),
on the same u8 images."""

from __future__ import annotations

import numpy as np
import openvino as ov

from xaiserve.service.model_info import ModelInfo

from .int8_agreement import top1_agreement


def compile_f32(model: ov.Model, core: ov.Core | None = None) -> ov.CompiledModel:
    """Compile on CPU in f32: this machine would infer in bf16 by default."""
    core = core or ov.Core()
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def normalised(images: np.ndarray, info: ModelInfo, layout: str = "NCHW",
               bgr: bool = False) -> np.ndarray:
    """u8 RGB NHWC -> the float tensor the IR computes internally, in the model's layout and
    channel order."""
    x = (images.astype(np.float32) - np.array(info.mean_values, np.float32)) \
        / np.array(info.scale_values, np.float32)
    if bgr:
        x = x[..., ::-1]
    return np.ascontiguousarray(x if layout == "NHWC" else x.transpose(0, 3, 1, 2))


def torch_input(images: np.ndarray, info: ModelInfo):
    import torch

    return torch.from_numpy(normalised(images, info))


def torch_logits(module, images: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Apply the same normalisation the IR embeds, run the module, return logits."""
    import torch

    with torch.no_grad():
        return module(torch_input(images, info)).numpy()


def source_logits(loaded, images: np.ndarray) -> np.ndarray:
    """The source's logits on `images`, normalised as the IR does (`loaded.info`): its torch
    module's, or a model file's as read (in f32)."""
    if loaded.torch_module is not None:
        return torch_logits(loaded.torch_module, images, loaded.info)
    compiled = compile_f32(loaded.source_model)
    return compiled(normalised(images, loaded.info, loaded.input_layout, loaded.bgr))[
        compiled.output(0)]


def parity(reference: np.ndarray, compiled: ov.CompiledModel, images: np.ndarray) -> dict:
    ours = compiled(images)["logits"]
    return {
        "images": int(len(images)),
        "max_abs_logit_diff": float(np.abs(reference - ours).max()),
        "top1_agreement": top1_agreement(reference, ours),
        "precision": "f32",
    }
