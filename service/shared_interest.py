"""Shared Interest (Boggust et al., CHI 2022) and the pointing game: how a saliency map agrees
with human ground truth (a mask or boxes). Pure numpy: arrays in, numbers out.

Binarisation follows the authors' code (`shared_interest/util.py`): min-max the map to [0, 1],
then keep pixels >= mean + k * std (k = 1); threshold and percentile are options. The settings
travel with every number (`as_parameters`) so a response can be reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PATTERNS_CORRECT = ("human_aligned", "sufficient_subset", "context_dependent",
                    "sufficient_context")
PATTERNS_WRONG = ("confuser", "insufficient_subset", "context_confusion", "distractor")
PATTERNS = PATTERNS_CORRECT + PATTERNS_WRONG


def _normalize_0to1(saliency: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros (the authors' code divides by zero)."""
    saliency = np.asarray(saliency, np.float64)
    lo, hi = float(saliency.min()), float(saliency.max())
    return (saliency - lo) / (hi - lo) if hi > lo else np.zeros_like(saliency)


def _threshold_std(normalized: np.ndarray, k: float) -> float:
    return float(normalized.mean() + k * normalized.std())


def _threshold_fixed(normalized: np.ndarray, value: float) -> float:
    return float(value)


def _threshold_percentile(normalized: np.ndarray, value: float) -> float:
    return float(np.percentile(normalized, value))


# mode -> (threshold on the min-max normalised map, default value, valid range of the value)
_BINARIZERS = {
    "std": (_threshold_std, 1.0, (0.0, 10.0)),
    "threshold": (_threshold_fixed, 0.5, (0.0, 1.0)),
    "percentile": (_threshold_percentile, 90.0, (0.0, 100.0)),
}
BINARIZATION_MODES = tuple(_BINARIZERS)


@dataclass(frozen=True)
class Binarization:
    """How a continuous map becomes the saliency set S. `value` is k for "std" (mean + k std),
    the cut on the min-max map for "threshold", the percentile (0..100) for "percentile";
    None takes the mode's default (1, 0.5, 90)."""

    mode: str = "std"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _BINARIZERS:
            raise ValueError(f"binarization mode {self.mode!r}: expected one of "
                             f"{', '.join(BINARIZATION_MODES)}")
        lo, hi = _BINARIZERS[self.mode][2]
        if self.value is not None and not (lo <= float(self.value) <= hi):
            raise ValueError(f"binarization value {self.value} for mode {self.mode!r}: "
                             f"expected {lo}..{hi}")

    @property
    def resolved_value(self) -> float:
        return float(_BINARIZERS[self.mode][1] if self.value is None else self.value)

    def as_parameters(self) -> dict[str, str]:
        return {"binarization": self.mode, "binarization_value": f"{self.resolved_value:g}",
                "normalization": "min-max", "comparison": ">="}


def binarize(saliency: np.ndarray, settings: Binarization = Binarization()) -> np.ndarray:
    """[H, W] map -> bool [H, W] saliency set S (on the min-max normalised map, >= the cut).

    The map's minimum is never salient: where more pixels than the percentile share it (maps
    that are zero outside the object, such as the centred ReciproCAM maps), a cut at the minimum
    would select the whole image; S is then the pixels above it."""
    normalized = _normalize_0to1(saliency)
    if not normalized.any():
        return np.zeros(normalized.shape, bool)  # a constant map selects nothing
    cut = _BINARIZERS[settings.mode][0](normalized, settings.resolved_value)
    return normalized >= cut if cut > 0 else normalized > 0


def _pixel_edge(coordinate: float) -> int:
    """The nearest pixel edge, halves up (Python's round() takes halves to the even edge)."""
    return int(math.floor(coordinate + 0.5))


def ground_truth_mask(height: int, width: int, boxes=None, mask: np.ndarray | None = None
                      ) -> np.ndarray:
    """Ground-truth set G: the union of the mask (nonzero pixels) and the boxes.

    Boxes are (x_min, y_min, x_max, y_max) in pixels, x_max/y_max exclusive, rounded to the
    nearest pixel edge (halves up, so that equal boxes shifted by one pixel cover equal areas);
    a box that is empty or reaches outside the image raises ValueError naming its index."""
    truth = np.zeros((height, width), bool)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                             f"{width}x{height}")
        truth |= mask > 0
    for i, box in enumerate(boxes or ()):
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"boxes[{i}] = {tuple(box)}: need x_min < x_max and y_min < y_max")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height or min(x0, y0) < 0 \
                or x1 > width or y1 > height:
            raise ValueError(f"boxes[{i}] = {tuple(box)}: outside the {width}x{height} image")
        c0, r0 = _pixel_edge(x0), _pixel_edge(y0)
        c1, r1 = max(_pixel_edge(x1), c0 + 1), max(_pixel_edge(y1), r0 + 1)
        truth[r0:r1, c0:c1] = True
    return truth


@dataclass(frozen=True)
class SharedInterestScores:
    """IoU = |G∩S|/|G∪S|, GTC = |G∩S|/|G|, SC = |G∩S|/|S|; sc_mass = saliency mass (min-max
    map) inside G / total mass, the continuous SC. An empty denominator gives 0."""

    iou: float
    gtc: float
    sc: float
    sc_mass: float


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def shared_interest(saliency: np.ndarray, truth: np.ndarray,
                    settings: Binarization = Binarization()) -> SharedInterestScores:
    """Scores of a map at the image's resolution against ground truth G of the same shape."""
    truth = np.asarray(truth, bool)
    if saliency.shape != truth.shape:
        raise ValueError(f"saliency {saliency.shape} and ground truth {truth.shape} differ")
    selected = binarize(saliency, settings)
    both = np.count_nonzero(selected & truth)
    normalized = _normalize_0to1(saliency)
    return SharedInterestScores(
        iou=_ratio(both, np.count_nonzero(selected | truth)),
        gtc=_ratio(both, np.count_nonzero(truth)),
        sc=_ratio(both, np.count_nonzero(selected)),
        sc_mass=_ratio(normalized[truth].sum(), normalized.sum()))


@dataclass(frozen=True)
class PatternCutoffs:
    """The paper gives no numbers; these are ours and travel with each pattern."""

    iou_high: float = 0.5
    gtc_high: float = 0.5
    sc_high: float = 0.5

    def __post_init__(self) -> None:
        for name in ("iou_high", "gtc_high", "sc_high"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)}: expected 0..1")

    def as_parameters(self) -> dict[str, str]:
        return {"iou_high": f"{self.iou_high:g}", "gtc_high": f"{self.gtc_high:g}",
                "sc_high": f"{self.sc_high:g}"}


def shared_interest_pattern(scores: SharedInterestScores, correct: bool,
                            cutoffs: PatternCutoffs = PatternCutoffs()) -> str:
    """One of the eight Shared Interest patterns (snake_case).

    In order: IoU high, or both SC and GTC high -> human_aligned / confuser; SC high ->
    sufficient_subset / insufficient_subset; GTC high -> context_dependent / context_confusion;
    else -> sufficient_context / distractor. The first name of each pair is for a correct
    prediction."""
    sc_high, gtc_high = scores.sc >= cutoffs.sc_high, scores.gtc >= cutoffs.gtc_high
    if scores.iou >= cutoffs.iou_high or (sc_high and gtc_high):
        index = 0
    elif sc_high:
        index = 1
    elif gtc_high:
        index = 2
    else:
        index = 3
    return (PATTERNS_CORRECT if correct else PATTERNS_WRONG)[index]


def pointing_game_hit(saliency: np.ndarray, truth: np.ndarray, tolerance_px: int = 0) -> bool:
    """Hit when the map's maximum (first in raster order among ties) lies in G, or within
    `tolerance_px` pixels of it (Zhang et al. use 15 px; 0 by default). A map that is constant
    or not finite points nowhere: a miss (its first pixel would otherwise count as a hit for any
    object touching the top-left corner)."""
    truth = np.asarray(truth, bool)
    if saliency.shape != truth.shape:
        raise ValueError(f"saliency {saliency.shape} and ground truth {truth.shape} differ")
    if not np.isfinite(saliency).all() or saliency.max() == saliency.min():
        return False
    y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    if tolerance_px <= 0:
        return bool(truth[y, x])
    r = int(tolerance_px)
    y0, y1 = max(0, y - r), min(truth.shape[0], y + r + 1)
    x0, x1 = max(0, x - r), min(truth.shape[1], x + r + 1)
    ys, xs = np.ogrid[y0:y1, x0:x1]
    disk = (ys - y) ** 2 + (xs - x) ** 2 <= r * r
    return bool((truth[y0:y1, x0:x1] & disk).any())
