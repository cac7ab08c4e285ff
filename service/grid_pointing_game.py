"""Grid pointing game (Rao, Boehle, Schiele, CVPR 2022): pure functions, arrays in, numbers out.

n x n images of distinct classes are tiled into one mosaic; each cell's class is explained in
turn and the score is the share of the map's positive mass inside that cell (1/n^2 for a uniform
map, 1 for a perfect one). It needs no box annotations, so any labelled data set can play it.
Used by `xaiserve evaluate` and by benchmarks/grid_pointing_game.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import cv2
import numpy as np


def cell_origins(cell: int, n: int = 2) -> list[tuple[int, int]]:
    """(top, left) of each cell, in reading order."""
    return [(r * cell, c * cell) for r in range(n) for c in range(n)]


def build_mosaic(cells: Sequence[np.ndarray], n: int = 2) -> np.ndarray:
    """n*n RGB u8 cells of one size [c, c, 3] -> the [n*c, n*c, 3] mosaic in reading order."""
    cell = cells[0].shape[0]
    mosaic = np.zeros((n * cell, n * cell, 3), dtype=np.uint8)
    for (top, left), image in zip(cell_origins(cell, n), cells):
        mosaic[top:top + cell, left:left + cell] = image
    return mosaic


def grid_score(saliency: np.ndarray, cell: int, size: int, n: int = 2) -> float:
    """Positive mass inside cell number `cell` / total positive mass, after bilinear upsampling
    of the [h, w] map to the [size, size] mosaic. An empty map points nowhere: chance, 1/n^2.

    Only the sign counts as evidence, so a map's zero point matters (a min-max map counts
    everything but its weakest location)."""
    up = cv2.resize(saliency.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    positive = np.maximum(up, 0.0)
    total = float(positive.sum())
    if total <= 0.0:
        return 1.0 / (n * n)
    # Cell edges cover every pixel, also where n does not divide the size (299: 149 and 150).
    edges = np.round(np.linspace(0, size, n + 1)).astype(int)
    row, column = divmod(cell, n)
    inside = positive[edges[row]:edges[row + 1], edges[column]:edges[column + 1]]
    return float(inside.sum()) / total


def choose_mosaics(names: Sequence[str], count: int, seed: int, n: int = 2
                   ) -> list[tuple[str, ...]]:
    """Up to `count` distinct ordered n*n-tuples of distinct names, deterministic for a seed.

    Every subset is used once before any is repeated in another order, so each name appears
    about equally often and in every cell."""
    k = n * n
    rng = np.random.default_rng(seed)
    subsets = list(itertools.combinations(names, k))
    rng.shuffle(subsets)
    wanted = min(count, len(subsets) * math.factorial(k))
    chosen: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    while len(chosen) < wanted:
        for subset in subsets:
            order = tuple(subset[i] for i in rng.permutation(k))
            if order not in seen:
                seen.add(order)
                chosen.append(order)
                if len(chosen) == wanted:
                    break
    return chosen


def distinct_class_mosaics(labels: Sequence[int], count: int, seed: int, n: int = 2
                           ) -> list[tuple[int, ...]]:
    """Mosaics drawn from a labelled data set: tuples of item indices whose labels differ.

    Each mosaic takes n*n distinct classes (chosen like `choose_mosaics`, so every class lands
    in every cell) and one random image of each. Fewer than n*n classes: no mosaics."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    if len(by_class) < n * n:
        return []
    rng = np.random.default_rng(seed + 1)
    classes = [str(c) for c in sorted(by_class)]
    return [tuple(int(rng.choice(by_class[int(c)])) for c in combo)
            for combo in choose_mosaics(classes, count, seed, n)]


def summarise(scores: Sequence[float], n: int = 2) -> dict[str, float]:
    """Mean, standard error and the share of targets above chance."""
    v = np.asarray(scores, dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "sem": float("nan"), "above_chance": float("nan"), "n": 0,
                "chance": 1.0 / (n * n)}
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sem": sem, "above_chance": float((v > 1.0 / (n * n)).mean()),
            "n": int(v.size), "chance": 1.0 / (n * n)}
