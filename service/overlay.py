"""Pictures of saliency maps: a heatmap blended over the photo with a legend of classes."""

from __future__ import annotations

import cv2
import numpy as np

from . import atomic_file


def upsample(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] map -> [height, width], bilinear, min-max scaled to 0..1."""
    resized = cv2.resize(saliency.astype(np.float32), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    lo, hi = float(resized.min()), float(resized.max())
    return (resized - lo) / (hi - lo) if hi > lo else np.zeros_like(resized)


def overlay(image: np.ndarray, saliency: np.ndarray, legend: list[str],
            alpha: float = 0.5) -> np.ndarray:
    """RGB u8 photo + [h, w] map -> RGB u8 picture with a JET heatmap and a legend strip."""
    height, width = image.shape[:2]
    heat = (upsample(saliency, height, width) * 255).astype(np.uint8)
    colored = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 1 - alpha, colored, alpha, 0)
    scale = max(0.4, width / 900)
    line_h = int(28 * scale) + 6
    strip = np.full((line_h * len(legend) + 8, width, 3), 255, dtype=np.uint8)
    for i, text in enumerate(legend):
        # OpenCV's fonts draw ASCII, and a name that is not valid UTF-8 crashed it
        text = text.encode("ascii", "replace").decode("ascii")
        cv2.putText(strip, text, (6, (i + 1) * line_h), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), max(1, int(2 * scale)), cv2.LINE_AA)
    return np.vstack([blended, strip])


def write_png(path, rgb: np.ndarray) -> None:
    """Encoded here and written by Python: OpenCV given a path that is not valid UTF-8 crashed."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: cannot encode the PNG")
    atomic_file.write_bytes(path, png.tobytes())
