"""Agreement between two saliency maps of one image: pure functions, arrays in, numbers out.

Used to compare the IR's in-graph map with a reference method computed on the source model
(export-time checks). Both maps must have the same shape; bring one to the other's first."""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (clipped maps have many equal zeros)."""
    flat = np.asarray(values, np.float64).ravel()
    order = np.argsort(flat, kind="mergesort")
    ranks = np.empty(flat.size, np.float64)
    ranks[order] = np.arange(flat.size)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho between two maps of one shape; 0 when either map is constant."""
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape}: resize one first")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.2) -> float:
    """IoU of the top `fraction` of locations of each map (ties broken by position)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape}: resize one first")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: must be in (0, 1]")
    k = max(1, int(round(fraction * a.size)))
    top_a = set(np.argsort(-a.ravel(), kind="mergesort")[:k].tolist())
    top_b = set(np.argsort(-b.ravel(), kind="mergesort")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)
