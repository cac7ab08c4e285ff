"""Saliency maps in the forms a client asks for: float at feature resolution, u8 at image
resolution, a PNG heatmap or a PNG overlay."""

from __future__ import annotations

import cv2
import numpy as np

from .overlay import overlay, upsample


def to_u8_image(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    return (upsample(saliency, height, width) * 255).round().astype(np.uint8)


def to_png_heatmap(saliency: np.ndarray, height: int, width: int) -> bytes:
    heat = cv2.applyColorMap(to_u8_image(saliency, height, width), cv2.COLORMAP_JET)
    return _png(heat)


def to_png_overlay(saliency: np.ndarray, image: np.ndarray, legend: list[str]) -> bytes:
    return _png(cv2.cvtColor(overlay(image, saliency, legend), cv2.COLOR_RGB2BGR))


def _png(bgr: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()
