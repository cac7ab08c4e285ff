"""How far an INT8 model drifts from its f32 original: pure functions, arrays in, numbers out.

No labels are needed: the f32 IR is the reference. Maps are compared at feature resolution
(what the IR outputs, e.g. 7x7), for the f32 model's top-1 class, because upsampling adds
interpolated pixels that only repeat the same values."""

from __future__ import annotations

import math

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a flat array, ties sharing their mean rank (as Spearman needs)."""
    flat = np.asarray(values, np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    result = np.empty(len(flat))
    sorted_values = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(flat)]
    for s, e in zip(starts, ends):
        result[order[s:e]] = (s + e - 1) / 2.0
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps. Two constant maps agree (1.0); one constant map does not
    order anything the other does (0.0)."""
    ra, rb = ranks(a), ranks(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    na, nb = math.sqrt(float(da @ da)), math.sqrt(float(db @ db))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(da @ db / (na * nb))


def top_fraction(values: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ceil(fraction * n) largest pixels (ties broken by position)."""
    flat = np.asarray(values).ravel()
    k = max(1, math.ceil(fraction * len(flat)))
    mask = np.zeros(len(flat), bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.2) -> float:
    """IoU of the two maps' top `fraction` pixels: do both point at the same places?"""
    ma, mb = top_fraction(a, fraction), top_fraction(b, fraction)
    return float((ma & mb).sum() / (ma | mb).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """The share of images (rows) whose top-1 class `logits` keeps from `reference_logits`."""
    return float((logits.argmax(axis=1) == reference_logits.argmax(axis=1)).mean())


def agreement(reference_logits: np.ndarray, reference_maps: np.ndarray | None,
              logits: np.ndarray, maps: np.ndarray | None, fraction: float = 0.2,
              confident: float = 0.5) -> dict:
    """Top-1 agreement and saliency agreement of a model against a reference, on one image set.

    logits [n, K]; maps [n, K, h, w] or None. `top1_agreement_confident` counts only images the
    reference is sure of (softmax top-1 >= `confident`): flips between near-equal classes on
    ambiguous images are expected and say little about the quantisation."""
    top = reference_logits.argmax(axis=1)
    same = logits.argmax(axis=1) == top
    sure = softmax(reference_logits).max(axis=1) >= confident
    figures: dict = {
        "images": int(len(top)),
        "top1_agreement": float(same.mean()),
        "top1_drop": float(1.0 - same.mean()),
        # the reference's class still among the top 5: a flip to a near-equal class
        "top1_in_top5": float((np.argsort(-logits, axis=1)[:, :5] == top[:, None]).any(1).mean()),
        "confident_threshold": confident,
        "confident_images": int(sure.sum()),
        "top1_agreement_confident": float(same[sure].mean()) if sure.any() else None,
        "max_abs_logit_diff": float(np.abs(reference_logits - logits).max()),
    }
    if reference_maps is not None and maps is not None:
        rho = np.array([spearman(reference_maps[i, c], maps[i, c]) for i, c in enumerate(top)])
        iou = np.array([top_fraction_iou(reference_maps[i, c], maps[i, c], fraction)
                        for i, c in enumerate(top)])
        figures.update({
            "saliency_rank_correlation": float(rho.mean()),
            "saliency_rank_correlation_p05": float(np.percentile(rho, 5)),
            "saliency_top_fraction": fraction,
            "saliency_top_iou": float(iou.mean()),
        })
    return figures
