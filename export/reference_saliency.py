"""Reference saliency computed with torch on the source model, and its agreement with the IR.

Why: the IR's in-graph map is an approximation chosen for speed (ReciproCAM). At export time the
source model is still at hand, so gradient methods can be computed on it and compared with the
IR's `saliency_map` on the same inputs; `xaiserve export --reference gradcam
--min-reference-agreement 0.3` refuses to write an IR whose maps disagree with the reference.

Methods (a registry by name):
* `gradient`: vanilla gradient (Simonyan et al. 2013), |d logit_c / d x|, max over channels.
* `gradcam`: Grad-CAM (Selvaraju et al.), ReLU(sum_k a_k A_k), a_k = spatial mean of
  d logit_c / d A_k; A is the last 4-D spatial output of a leaf module (the last conv block),
  or the module named by `layer`.
Maps are compared at the IR map's resolution (the reference is area-averaged down to it):
Spearman rank correlation and IoU of the top `top_fraction` locations (the same measures as
the INT8 check, export/int8_agreement.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from xaiserve.service.dataset import IMAGE_SUFFIXES, MASK_SUFFIX
from xaiserve.service.images import ImageError, read_image, resize_for_model
from xaiserve.service.model_info import ModelInfo

from .int8_agreement import spearman, top_fraction_iou
from .parity import torch_input

METRICS = ("spearman", "topk_iou")


class ReferenceCheckError(ValueError):
    """The reference cannot be computed (no torch source, no 4-D layer, bad images)."""


class ReferenceGateError(RuntimeError):
    """The IR's maps agree with the reference less than the export was told to require."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


@dataclass(frozen=True)
class ReferenceCheck:
    method: str = "gradcam"
    min_agreement: float | None = None  # None: record the figures, never fail
    metric: str = "spearman"
    top_fraction: float = 0.2
    layer: str | None = None  # torch module name for Grad-CAM; None: the last 4-D leaf output
    images: Path | None = None  # a folder of images (searched recursively); None: parity images


def vanilla_gradient(module, images: np.ndarray, classes: list[int], info: ModelInfo,
                     layer: str | None = None) -> np.ndarray:
    """[N, H, W]: |d logit_c / d x| with the maximum over colour channels."""
    import torch

    x = torch_input(images, info).requires_grad_(True)
    with torch.enable_grad():
        logits = module(x)
        picked = logits[torch.arange(len(classes)), torch.as_tensor(classes)].sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad.abs().amax(dim=1).detach().numpy()


def _feature_module(module, x, layer: str | None):
    """The module whose output Grad-CAM uses: named, or the last leaf with a 4-D spatial output
    in execution order (the last conv block, before global pooling)."""
    import torch

    if layer is not None:
        named = dict(module.named_modules())
        if layer not in named:
            raise ReferenceCheckError(f"--reference-layer {layer!r}: no such module; some of its "
                                 f"modules: {list(named)[-8:]}")
        return named[layer]
    seen: list = []
    handles = [m.register_forward_hook(
        lambda m, _, out: seen.append(m) if isinstance(out, torch.Tensor) and out.dim() == 4
        and out.shape[2] * out.shape[3] > 1 else None)
        for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ReferenceCheckError("Grad-CAM needs a 4-D feature map and this model has none; use "
                             "--reference gradient")
    return seen[-1]


def gradcam(module, images: np.ndarray, classes: list[int], info: ModelInfo,
            layer: str | None = None) -> np.ndarray:
    """[N, h, w] Grad-CAM maps at the feature map's resolution."""
    import torch

    x = torch_input(images, info)
    target = _feature_module(module, x, layer)
    captured = {}
    handle = target.register_forward_hook(lambda _, __, out: captured.__setitem__("a", out))
    try:
        with torch.enable_grad():
            logits = module(x)
            picked = logits[torch.arange(len(classes)), torch.as_tensor(classes)].sum()
            (grad,) = torch.autograd.grad(picked, captured["a"])
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * captured["a"]).sum(1)).detach().numpy()


ReferenceFn = Callable[..., np.ndarray]
METHODS: dict[str, ReferenceFn] = {"gradient": vanilla_gradient, "gradcam": gradcam}


def reference_images(folder: Path, info: ModelInfo, limit: int = 16) -> np.ndarray:
    """Up to `limit` images under `folder` (sorted, recursively; masks skipped), resized for
    the model."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file()
                   and p.name.lower().endswith(IMAGE_SUFFIXES)
                   and not p.name.lower().endswith(MASK_SUFFIX))[:limit]
    if not paths:
        raise ReferenceCheckError(f"--reference-images {folder}: no images found there")
    try:
        return np.stack([resize_for_model(read_image(p), info) for p in paths])
    except ImageError as exc:
        raise ReferenceCheckError(f"--reference-images: {exc}") from None


def _to_shape(reference: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(reference.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)


def compare(module, compiled, images: np.ndarray, info: ModelInfo,
            check: ReferenceCheck) -> dict:
    """Reference maps of each image's predicted class (by the IR) against the IR's maps."""
    if check.method not in METHODS:
        raise ReferenceCheckError(f"--reference {check.method!r}: choose one of {sorted(METHODS)}")
    out = compiled(images)
    if "saliency_map" not in {n for o in compiled.outputs for n in o.get_names()}:
        raise ReferenceCheckError("--reference: the IR has no saliency_map output (--method none)")
    classes = [int(c) for c in out["logits"].argmax(1)]
    saliency = out["saliency_map"]
    reference = METHODS[check.method](module, images, classes, info, check.layer)
    rows = []
    for i, c in enumerate(classes):
        ours = saliency[i, c if saliency.shape[1] > 1 else 0]
        theirs = _to_shape(reference[i], *ours.shape)
        rows.append({"class_id": c, "spearman": spearman(ours, theirs),
                     "topk_iou": top_fraction_iou(ours, theirs, check.top_fraction)})
    figures = {"method": check.method, "layer": check.layer or "auto", "images": len(images),
               "top_fraction": check.top_fraction,
               "spearman": float(np.mean([r["spearman"] for r in rows])),
               "topk_iou": float(np.mean([r["topk_iou"] for r in rows])),
               "per_image": rows, "gate_metric": check.metric,
               "min_agreement": check.min_agreement}
    figures["passed"] = check.min_agreement is None or \
        figures[check.metric] >= check.min_agreement
    return figures


def check_reference(module, compiled, images: np.ndarray, info: ModelInfo,
                    check: ReferenceCheck) -> dict:
    """The figures for the model card; raises ReferenceGateError below the threshold."""
    if check.metric not in METRICS:
        raise ReferenceCheckError(f"--reference-metric {check.metric!r}: choose one of {METRICS}")
    if check.images is not None:
        images = reference_images(check.images, info)
    figures = compare(module, compiled, images, info, check)
    if not figures["passed"]:
        raise ReferenceGateError(
            f"--min-reference-agreement {check.min_agreement}: the IR's maps agree with "
            f"{check.method} at {check.metric} {figures[check.metric]:.3f} on "
            f"{figures['images']} images; nothing was written (lower the threshold, pick "
            "another --method/--normalize, or check the model)", figures)
    return figures
