"""Parity of the exported IR against its source framework, on the same u8 images."""

from __future__ import annotations

import numpy as np
import openvino as ov

from xaiserve.service.model_info import ModelInfo

from .int8_agreement import top1_agreement


def compile_f32(model: ov.Model, core: ov.Core | None = None) -> ov.CompiledModel:
    """Compile on CPU in f32: this machine would infer in bf16 by default."""
    core = core or ov.Core()
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def torch_input(images: np.ndarray, info: ModelInfo):
    """u8 NHWC -> the float NCHW tensor the IR computes internally."""
    import torch

    x = (images.astype(np.float32) - np.array(info.mean_values, np.float32)) \
        / np.array(info.scale_values, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_logits(module, images: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Apply the same normalisation the IR embeds, run the module, return logits."""
    import torch

    with torch.no_grad():
        return module(torch_input(images, info)).numpy()


def parity(module, compiled: ov.CompiledModel, images: np.ndarray, info: ModelInfo) -> dict:
    reference = torch_logits(module, images, info)
    ours = compiled(images)["logits"]
    return {
        "images": int(len(images)),
        "max_abs_logit_diff": float(np.abs(reference - ours).max()),
        "top1_agreement": top1_agreement(reference, ours),
        "precision": "f32",
    }
