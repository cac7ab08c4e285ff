"""Per-request metrics: pure functions, arrays in, numbers out.

Softmax turns logits into the scores the others read. Confidence, margin and entropy describe
the prediction; coverage and concentration describe a map; the prediction case follows the
OpenVINO XAI interpretation guide's four cases."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class scores along the last axis; stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def top1_confidence(probabilities: np.ndarray) -> float:
    return float(np.max(probabilities))


def margin(probabilities: np.ndarray) -> float:
    """Top-1 minus top-2 probability: small when two classes compete."""
    if len(probabilities) < 2:
        return float(probabilities[-1])
    second, first = np.partition(probabilities, -2)[-2:]
    return float(first - second)


def entropy(probabilities: np.ndarray) -> float:
    """Shannon entropy in nats."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def coverage(saliency: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of the map at or above `threshold` of its peak."""
    peak = float(saliency.max())
    return float((saliency >= threshold * peak).mean()) if peak > 0 else 0.0


def concentration(saliency: np.ndarray, top_fraction: float = 0.1) -> float:
    """Share of the map's positive mass in its top `top_fraction` of locations (1 = all of it
    in a few spots; `top_fraction` = spread evenly)."""
    values = np.clip(saliency.ravel(), 0, None)
    total = float(values.sum())
    if total <= 0:
        return 0.0
    k = max(1, int(round(top_fraction * values.size)))
    return float(np.sort(values)[-k:].sum() / total)


@dataclass(frozen=True)
class CaseThresholds:
    high_confidence: float = 0.5
    competing_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("high_confidence", "competing_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # NaN fails too
                raise ValueError(f"{name} {getattr(self, name)}: expected 0..1")


def prediction_case(probabilities: np.ndarray, label: int, thresholds: CaseThresholds) -> str:
    """true_positive_high_confidence, true_positive_low_confidence,
    false_positive_high_confidence, two_competing_predictions, or false_positive_low_confidence.
    """
    predicted = int(np.argmax(probabilities))
    confidence = top1_confidence(probabilities)
    if margin(probabilities) < thresholds.competing_margin:
        return "two_competing_predictions"
    high = confidence >= thresholds.high_confidence
    if predicted == label:
        return "true_positive_high_confidence" if high else "true_positive_low_confidence"
    return "false_positive_high_confidence" if high else "false_positive_low_confidence"
