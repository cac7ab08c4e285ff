"""Explanation-quality metrics for one image and one map, by name: the glue between a request
(the server's or the CLI's) and the pure metric libraries `shared_interest` and `faithfulness`.

Shared Interest and the pointing game compare the map, brought to the image's resolution, with
the ground truth; faithfulness re-scores perturbed model inputs through a batched `score_fn`.
Every entry carries the parameters that reproduce it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import faithfulness as fm
from .model_info import ModelInfo
from .request_metrics import softmax
from .shared_interest import (Binarization, PatternCutoffs, ground_truth_mask,
                              pointing_game_hit, shared_interest, shared_interest_pattern)

SHARED_INTEREST_METRICS = ("iou", "gtc", "sc", "sc_mass", "pointing_game",
                           "shared_interest_pattern")
GROUPS = {
    "faithfulness": fm.METRIC_NAMES,
    "shared_interest": SHARED_INTEREST_METRICS,
    "all": SHARED_INTEREST_METRICS + fm.METRIC_NAMES,
}
METRIC_NAMES = SHARED_INTEREST_METRICS + fm.METRIC_NAMES
MetricValue = fm.MetricValue


class QualityError(ValueError):
    """Bad input; the message starts with the request field it concerns."""


def resolve_names(names: Iterable[str]) -> tuple[list[str], bool]:
    """Requested names -> (faithfulness metrics to compute, whether Shared Interest was asked
    for explicitly). Groups: "all", "faithfulness", "shared_interest"."""
    wanted: list[str] = []
    for i, name in enumerate(names):
        name = name.strip().lower()
        if name in GROUPS:
            wanted.extend(GROUPS[name])
        elif name in METRIC_NAMES:
            wanted.append(name)
        else:
            raise QualityError(f"metrics[{i}] = {name!r}: unknown; expected one of "
                               f"{', '.join(list(GROUPS) + list(METRIC_NAMES))}")
    wanted = list(dict.fromkeys(wanted))
    explicit_si = any(n.strip().lower() in SHARED_INTEREST_METRICS + ("shared_interest",)
                      for n in names)
    return [n for n in wanted if n in fm.METRICS], explicit_si


@dataclass(frozen=True)
class QualityRequest:
    """What one request asks for. `boxes` are (x_min, y_min, x_max, y_max) image pixels;
    `mask` is a [H, W] array at the image's resolution (nonzero = object)."""

    names: Sequence[str] = ()
    boxes: Sequence[Sequence[float]] = ()
    mask: np.ndarray | None = None
    label: int | None = None
    binarization: Binarization = field(default_factory=Binarization)
    cutoffs: PatternCutoffs = field(default_factory=PatternCutoffs)
    faithfulness: fm.FaithfulnessSettings = field(default_factory=fm.FaithfulnessSettings)
    pointing_tolerance_px: int = 0

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.boxes) or self.mask is not None


def saliency_on_image(saliency: np.ndarray, height: int, width: int,
                      info: ModelInfo | None = None) -> np.ndarray:
    """A map over the model's input -> float [height, width] over the original image, min-max
    scaled to [0, 1], undoing the model's resize: `standard` stretches, `crop` gives pixels
    outside the centre crop the map's minimum, `fit_to_window*` drops the padding."""
    resize_type = info.resize_type if info else "standard"
    saliency = saliency.astype(np.float32)
    if resize_type != "standard":
        h, w = info.input_height, info.input_width
        at_input = cv2.resize(saliency, (w, h), interpolation=cv2.INTER_LINEAR)
        if resize_type == "crop":
            scale = max(h / height, w / width)
            rh, rw = max(h, round(height * scale)), max(w, round(width * scale))
            top, left = (rh - h) // 2, (rw - w) // 2
            saliency = np.full((rh, rw), at_input.min(), np.float32)
            saliency[top:top + h, left:left + w] = at_input
        elif resize_type.startswith("fit_to_window"):
            scale = min(h / height, w / width)
            nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
            top = (h - nh) // 2 if resize_type.endswith("letterbox") else 0
            left = (w - nw) // 2 if resize_type.endswith("letterbox") else 0
            saliency = at_input[top:top + nh, left:left + nw]
    resized = cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(resized.min()), float(resized.max())
    return (resized - lo) / (hi - lo) if hi > lo else np.zeros_like(resized)


def model_scorer(model) -> fm.ScoreFn:
    """A served ClassifierModel as the faithfulness metrics' batched scoring function:
    u8 [N, H, W, 3] at the model's input size -> softmax [N, K]."""
    def score(images: np.ndarray) -> np.ndarray:
        logits = model.predict(np.ascontiguousarray(images), outputs=("logits",))["logits"]
        return softmax(logits.astype(np.float64))
    return score


def ground_truth_metrics(request: QualityRequest, image_saliency: np.ndarray, class_id: int,
                         predicted: int) -> list[MetricValue]:
    """IoU, GTC, SC, continuous SC and the pointing game; the pattern when a label is known."""
    height, width = image_saliency.shape
    try:
        truth = ground_truth_mask(height, width, request.boxes, request.mask)
    except ValueError as exc:
        raise QualityError(f"ground_truth.{exc}") from None
    if not truth.any():
        raise QualityError("ground_truth: the mask and boxes cover no pixel; send a mask with "
                           "nonzero object pixels or a box")
    sources = "+".join(s for s, present in (("mask", request.mask is not None),
                                           ("boxes", bool(request.boxes))) if present)
    common = {"class_id": str(class_id), "ground_truth": sources,
              "ground_truth_pixels": str(int(truth.sum())),
              "map": f"bilinear to the {width}x{height} image, min-max"}
    scores = shared_interest(image_saliency, truth, request.binarization)
    binarized = {**common, **request.binarization.as_parameters()}
    out = [MetricValue("iou", scores.iou, binarized), MetricValue("gtc", scores.gtc, binarized),
           MetricValue("sc", scores.sc, binarized),
           MetricValue("sc_mass", scores.sc_mass, {**common, "form": "continuous"}),
           MetricValue("pointing_game",
                       float(pointing_game_hit(image_saliency, truth,
                                               request.pointing_tolerance_px)),
                       {**common, "tolerance_px": str(request.pointing_tolerance_px),
                        "ties": "first maximum in raster order"})]
    if request.label is not None:
        correct = predicted == request.label
        pattern = shared_interest_pattern(scores, correct, request.cutoffs)
        out.append(MetricValue("shared_interest_pattern", 0.0, {
            **binarized, **request.cutoffs.as_parameters(), "label": str(request.label),
            "predicted": str(predicted), "correct": str(correct).lower()}, text=pattern))
    return out


def quality_metrics(request: QualityRequest, image: np.ndarray, model_input: np.ndarray,
                    saliency: np.ndarray, class_id: int, predicted: int,
                    score_fn: fm.ScoreFn | None, info: ModelInfo | None = None
                    ) -> list[MetricValue]:
    """All metrics the request asks for, for the map of `class_id`. Ground-truth metrics come
    whenever ground truth is given; faithfulness only by name (it costs inferences)."""
    faithfulness_names, explicit_si = resolve_names(request.names)
    out: list[MetricValue] = []
    if request.has_ground_truth:
        on_image = saliency_on_image(saliency, image.shape[0], image.shape[1], info)
        out.extend(ground_truth_metrics(request, on_image, class_id, predicted))
    elif explicit_si:
        raise QualityError("metrics: Shared Interest and the pointing game need "
                           "ground_truth.boxes or ground_truth.mask_png")
    if faithfulness_names:
        if score_fn is None:
            raise QualityError("metrics: faithfulness metrics need the model")
        out.extend(fm.compute(faithfulness_names, model_input, saliency, class_id, score_fn,
                              request.faithfulness))
    return out
