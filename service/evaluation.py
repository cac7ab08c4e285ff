"""Per-image evaluation of a model's explanations on a labelled data set.

`evaluate_items` is the one function that turns data set items into result rows: the local loop
calls it on chunks, and each Ray worker calls it on its batches with its own compiled model, so
both paths give the same numbers. The metrics themselves are pure functions in
`shared_interest`, `faithfulness`, `request_metrics` and `grid_pointing_game`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from . import grid_pointing_game as gpg
from .dataset import DatasetError, DatasetItem, load_ground_truth, load_image
from .eval_backend import LOGITS_OUTPUT, SALIENCY_OUTPUT, Backend, BackendError
from .explanation_quality import saliency_on_image
from .faithfulness import FaithfulnessSettings, deletion_insertion, single_step
from .images import resize_for_model
from .model_info import ModelInfo
from .request_metrics import (CaseThresholds, entropy, margin, prediction_case, softmax,
                              top1_confidence)
from .shared_interest import (Binarization, PatternCutoffs, pointing_game_hit, shared_interest,
                              shared_interest_pattern)


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything that changes the numbers; written into the report's summary."""

    binarization: Binarization = field(default_factory=Binarization)
    cutoffs: PatternCutoffs = field(default_factory=PatternCutoffs)
    cases: CaseThresholds = field(default_factory=CaseThresholds)
    faithfulness: FaithfulnessSettings = field(default_factory=FaithfulnessSettings)
    with_faithfulness: bool = True
    grid_mosaics: int = 40
    grid_methods: tuple[str, ...] = ("saliency_map",)
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ImageResult:
    """One image's numbers (a flat row for JSON/CSV), its curves and its map (for overlays)."""

    row: dict
    curves: dict[str, list[float]]
    saliency: np.ndarray  # [h, w] map of the predicted class, as the model gave it

    def to_json(self) -> dict:
        return {"row": self.row, "curves": self.curves,
                "saliency": self.saliency.astype(np.float32).tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "ImageResult":
        return cls(d["row"], d["curves"], np.asarray(d["saliency"], np.float32))


def score_function(backend: Backend):
    """A batched `score_fn(u8 [N, H, W, 3]) -> softmax [N, K]` for the faithfulness metrics."""
    def score(images: np.ndarray) -> np.ndarray:
        logits = backend.infer(np.ascontiguousarray(images), (LOGITS_OUTPUT,))[LOGITS_OUTPUT]
        return softmax(logits.astype(np.float64))

    return score


def evaluate_image(model_input: np.ndarray, ground_truth: np.ndarray | None, label: int,
                   logits: np.ndarray, saliency: np.ndarray, score_fn,
                   settings: EvaluationSettings, info: ModelInfo
                   ) -> tuple[dict, dict[str, list[float]]]:
    """One image as the model saw it (u8 [H, W, 3]), its ground truth at the image's own size
    (or None), its logits [K] and the predicted class's map [h, w] -> (numbers, curves).

    Shared Interest and the pointing game compare the map brought back onto the image (the
    model's resize undone, as `xaiserve explain --mask` does), so both give the same numbers;
    the faithfulness metrics perturb the model's input cell by cell of the map."""
    probs = softmax(logits.astype(np.float64))
    predicted = int(np.argmax(probs))
    row = {
        "predicted": predicted,
        "correct": predicted == label,
        "confidence": top1_confidence(probs),
        "label_probability": float(probs[label]),
        "margin": margin(probs),
        "entropy": entropy(probs),
        "case": prediction_case(probs, label, settings.cases),
    }
    if ground_truth is not None and ground_truth.any():
        dense = saliency_on_image(saliency, *ground_truth.shape, info)
        scores = shared_interest(dense, ground_truth, settings.binarization)
        row.update(iou=scores.iou, gtc=scores.gtc, sc=scores.sc, sc_mass=scores.sc_mass,
                   pattern=shared_interest_pattern(scores, predicted == label, settings.cutoffs),
                   pointing_hit=bool(pointing_game_hit(dense, ground_truth)))
    else:
        row.update(iou=None, gtc=None, sc=None, sc_mass=None, pattern=None, pointing_hit=None)
    curves: dict[str, list[float]] = {}
    if settings.with_faithfulness:
        row_curves = faithfulness(model_input, saliency, predicted, score_fn,
                                  settings.faithfulness)
        row.update(row_curves[0])
        curves = row_curves[1]
    return row, curves


def _finite(value: float) -> float | None:
    """NaN (a correlation over a constant curve) becomes None: JSON has no NaN."""
    return None if np.isnan(value) else float(value)


def faithfulness(image: np.ndarray, saliency: np.ndarray, class_id: int, score_fn,
                 settings: FaithfulnessSettings) -> tuple[dict, dict[str, list[float]]]:
    """Deletion and insertion (AUC, DC/IC, curve) and the single-step AD, IIC, ADD of one map
    at its own resolution (cells are perturbed whole)."""
    deletion = deletion_insertion(image, saliency, class_id, score_fn, "deletion", settings)
    insertion = deletion_insertion(image, saliency, class_id, score_fn, "insertion", settings)
    single = single_step(image, saliency, class_id, score_fn, settings)
    numbers = {
        "deletion_auc": deletion.auc, "insertion_auc": insertion.auc,
        "deletion_correlation": _finite(deletion.correlation),
        "insertion_correlation": _finite(insertion.correlation),
        "average_drop": single.average_drop,
        "increase_in_confidence": single.increase_in_confidence,
        "average_drop_in_deletion": single.average_drop_in_deletion,
    }
    curves = {"deletion": deletion.scores.tolist(), "insertion": insertion.scores.tolist()}
    return numbers, curves


def evaluate_items(backend: Backend, items: list[DatasetItem],
                   settings: EvaluationSettings) -> list[ImageResult]:
    """Read, infer (one batch) and evaluate `items`; the rows name each image and its class.

    An image or mask that cannot be read gives a row with an `error` (and no numbers) instead
    of stopping the run: one bad file in a large data set should not cost the rest."""
    info = backend.info
    loaded, failed = {}, {}
    for i, item in enumerate(items):
        try:
            original = load_image(item)
            truth = load_ground_truth(item, *original.shape[:2])
            loaded[i] = (resize_for_model(original, info), truth)
        except DatasetError as exc:
            failed[i] = str(exc)
    results: dict[int, ImageResult] = {
        i: ImageResult({"image": items[i].relative, "class_name": items[i].class_name,
                        "label": items[i].label, "error": message}, {},
                       np.zeros((0, 0), np.float32))
        for i, message in failed.items()}
    if loaded:
        order = sorted(loaded)
        batch = np.stack([loaded[i][0] for i in order])
        out = backend.infer(batch, (LOGITS_OUTPUT, SALIENCY_OUTPUT))
        score_fn = score_function(backend)
        for k, i in enumerate(order):
            item = items[i]
            logits = out[LOGITS_OUTPUT][k]
            predicted = int(np.argmax(logits))
            maps = out[SALIENCY_OUTPUT][k]
            saliency = maps[predicted if maps.shape[0] > 1 else 0]
            numbers, curves = evaluate_image(batch[k], loaded[i][1], item.label, logits,
                                             saliency, score_fn, settings, info)
            row = {"image": item.relative, "class_name": item.class_name, "label": item.label,
                   "ground_truth": ("mask" if item.mask_path else
                                    "boxes" if item.boxes else "none"),
                   **numbers, "predicted_label": info.labels[numbers["predicted"]]}
            results[i] = ImageResult(row, curves, np.asarray(saliency, np.float32))
    return [results[i] for i in range(len(items))]


def saliency_map_maps(backend: Backend, mosaic: np.ndarray, targets: list[int]) -> np.ndarray:
    """The model's own in-graph maps of the target classes: [len(targets), h, w]."""
    maps = backend.infer(mosaic[None], (SALIENCY_OUTPUT,))[SALIENCY_OUTPUT][0]
    return np.stack([maps[t if maps.shape[0] > 1 else 0] for t in targets])


def rise_maps(backend: Backend, mosaic: np.ndarray, targets: list[int]) -> np.ndarray:
    """Black-box RISE maps (service/rise.py, its default masks) of the same model, in-process."""
    from .rise import RiseExplainer

    model = getattr(backend, "model", None)  # a ClassifierModel in-process, a name remotely
    if not hasattr(model, "masked_scoring"):
        raise BackendError("--grid-methods rise runs in-process only (--model-path)")
    return RiseExplainer().explain(model.masked_scoring(), mosaic, targets)


# Methods the grid pointing game can compare, by name: (backend, mosaic, targets) -> maps.
GRID_METHODS = {"saliency_map": saliency_map_maps, "rise": rise_maps}


@dataclass
class GridGame:
    """Scores of the built-in grid pointing game per method, and a few mosaics to show (with
    the first method's maps)."""

    scores: dict[str, list[float]]
    mosaics: list[list[str]]  # image ids per mosaic, reading order
    examples: list[dict] = field(default_factory=list)  # {"mosaic", "maps", "targets"}

    def summary(self) -> dict:
        return {method: gpg.summarise(values) for method, values in self.scores.items()}


def play_grid_game(backend: Backend, items: list[DatasetItem], settings: EvaluationSettings,
                   keep: int = 3, unreadable: tuple[int, ...] = (),
                   progress: Callable[[int, int], None] | None = None) -> GridGame:
    """2x2 mosaics of images of distinct classes at the model's input size; each cell's class is
    explained by every method in `settings.grid_methods` and scored by the positive mass of its
    map in that cell. `progress(done, total)` after each mosaic (RISE takes seconds each)."""
    info = backend.info
    size = min(info.input_height, info.input_width)
    cell = size // 2
    picks = gpg.distinct_class_mosaics([item.label for item in items], settings.grid_mosaics,
                                       settings.seed)
    readable = set(range(len(items))) - set(unreadable)
    picks = [p for p in picks if readable.issuperset(p)]
    game = GridGame({method: [] for method in settings.grid_methods}, [])
    for number, pick in enumerate(picks):
        cells = [cv2.resize(load_image(items[i]), (cell, cell), interpolation=cv2.INTER_AREA)
                 for i in pick]
        mosaic = resize_for_model(gpg.build_mosaic(cells), info)
        targets = [items[i].label for i in pick]
        for m, method in enumerate(settings.grid_methods):
            maps = GRID_METHODS[method](backend, mosaic, targets)
            game.scores[method].extend(gpg.grid_score(maps[k], k, size) for k in range(4))
            if m == 0 and number < keep:
                game.examples.append({"mosaic": mosaic, "maps": list(maps),
                                      "targets": [info.labels[t] for t in targets]})
        game.mosaics.append([items[i].relative for i in pick])
        if progress is not None:
            progress(number + 1, len(picks))
    return game
