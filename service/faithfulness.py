"""Faithfulness of a saliency map, measured by perturbing the image and re-scoring it.

Deletion / insertion AUC with their correlations DC / IC (Petsiuk et al.; Gomez et al.), Average
Drop, Increase in Confidence and Average Drop in Deletion. Definitions follow the PyPI package
`saliency-maps-metrics` (Gomez et al., "Computing and evaluating saliency maps for image
classification: a tutorial") so the numbers agree with it on the same inputs; the tests check it.

Everything is pure numpy. Inference is the caller's: `score_fn(images u8 [N, H, W, 3]) -> [N, K]`
softmax scores. Each curve is scored in chunks of `batch_size` images, so a server batches the
extra inferences and an offline evaluation can pass any model.

Intended differences from saliency-maps-metrics:
- Images are u8 (the served model's input): perturbed images are rounded and clipped to 0..255.
- When the map's cell count is not a multiple of `steps`, the package crashes on its last step;
  here step boundaries are `round(linspace(0, cells, steps + 1))`, the same as the package's
  when the count is a multiple.
- Ties in the map are broken by raster order (a stable sort); torch.topk leaves them unspecified.
- A "mean" substrate (the image's per-channel mean colour) is added to "black" and "blur".
- The package's np.trapz is gone from numpy 2; np.trapezoid is the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]

MAX_STEPS = 1024
MAX_BATCH_SIZE = 256


# --- substrates: what removed pixels become ------------------------------------------------------

def _box_blur(image: np.ndarray, kernel: int) -> np.ndarray:
    """Box mean over kernel x kernel with zero padding and a constant divisor, as the package's
    conv2d (so borders darken); float [H, W, 3]."""
    pad = kernel // 2
    padded = np.pad(image.astype(np.float64), ((pad + 1, pad), (pad + 1, pad), (0, 0)))
    integral = padded.cumsum(0).cumsum(1)
    h, w = image.shape[:2]
    total = (integral[kernel:kernel + h, kernel:kernel + w] - integral[:h, kernel:kernel + w]
             - integral[kernel:kernel + h, :w] + integral[:h, :w])
    return total / (kernel * kernel)


def blur_kernel_size(height: int, kernel: int = 0) -> int:
    """0: the package's rule, max(H // 5, 9) made odd."""
    size = kernel or max(height // 5, 9)
    return size + 1 if size % 2 == 0 else size


def _black(image: np.ndarray, settings: "FaithfulnessSettings") -> np.ndarray:
    return np.zeros(image.shape, np.float64)


def _blur(image: np.ndarray, settings: "FaithfulnessSettings") -> np.ndarray:
    return _box_blur(image, blur_kernel_size(image.shape[0], settings.blur_kernel))


def _mean(image: np.ndarray, settings: "FaithfulnessSettings") -> np.ndarray:
    return np.broadcast_to(image.reshape(-1, 3).mean(0), image.shape).astype(np.float64)


SUBSTRATES: dict[str, Callable[[np.ndarray, "FaithfulnessSettings"], np.ndarray]] = {
    "black": _black, "blur": _blur, "mean": _mean}


def substrate(image: np.ndarray, name: str, settings: "FaithfulnessSettings") -> np.ndarray:
    """The float [H, W, 3] image that replaces (deletion) or is revealed from (insertion)."""
    return SUBSTRATES[name](image, settings)


# --- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaithfulnessSettings:
    """Perturbation settings. The per-metric substrates default to the package's (deletion black,
    insertion blur, the single-step metrics black); `with_substrate` sets all three. `steps` is
    the package's max_step_nb (14 x 14): a map with fewer cells takes one step per cell.
    `blur_kernel` 0 is the package's size rule."""

    deletion_substrate: str = "black"
    insertion_substrate: str = "blur"
    single_step_substrate: str = "black"
    steps: int = 196
    blur_kernel: int = 0
    batch_size: int = 32
    score: str = "softmax"

    def __post_init__(self) -> None:
        for name in ("deletion_substrate", "insertion_substrate", "single_step_substrate"):
            if getattr(self, name) not in SUBSTRATES:
                raise ValueError(f"substrate {getattr(self, name)!r}: expected one of "
                                 f"{', '.join(SUBSTRATES)}")
        if not 1 <= int(self.steps) <= MAX_STEPS:
            raise ValueError(f"steps {self.steps}: expected 1..{MAX_STEPS}")
        if self.blur_kernel and not 1 <= int(self.blur_kernel) <= 255:
            raise ValueError(f"blur_kernel {self.blur_kernel}: expected 0 (auto) or 1..255")
        if not 1 <= int(self.batch_size) <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size {self.batch_size}: expected 1..{MAX_BATCH_SIZE}")
        if self.score != "softmax":
            raise ValueError(f"score {self.score!r}: only 'softmax' is supported")

    def with_substrate(self, name: str) -> "FaithfulnessSettings":
        return replace(self, deletion_substrate=name, insertion_substrate=name,
                       single_step_substrate=name)

    def _common(self, substrate_name: str, height: int) -> dict[str, str]:
        out = {"substrate": substrate_name, "score": self.score}
        if substrate_name == "blur":
            out["blur"] = "box, zero padding"
            out["blur_kernel"] = str(blur_kernel_size(height, self.blur_kernel))
        return out

    def as_parameters(self, kind: str, height: int = 224) -> dict[str, str]:
        """Parameters of one metric family: "deletion", "insertion" or "single_step"."""
        if kind == "single_step":
            return {**self._common(self.single_step_substrate, height),
                    "mask": "min-max map, bicubic to input size"}
        name = self.deletion_substrate if kind == "deletion" else self.insertion_substrate
        return {**self._common(name, height), "max_steps": str(self.steps),
                "order": "map cells by decreasing saliency", "auc": "trapezoid on [0, 1]",
                "cumulative": "true"}


# --- helpers -------------------------------------------------------------------------------------

def _to_u8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _score_in_chunks(images: Iterable[np.ndarray], count: int, class_id: int,
                     score_fn: ScoreFn, batch_size: int) -> np.ndarray:
    """Score a stream of u8 images for one class, `batch_size` at a time."""
    scores, chunk = [], []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch_size:
            scores.append(np.asarray(score_fn(np.stack(chunk)))[:, class_id])
            chunk = []
    if chunk:
        scores.append(np.asarray(score_fn(np.stack(chunk)))[:, class_id])
    out = np.concatenate(scores).astype(np.float64)
    assert len(out) == count
    return out


def _nearest_indices(n_out: int, n_in: int) -> np.ndarray:
    """torch 'nearest' (floor(dst * in / out)) in integer arithmetic."""
    return (np.arange(n_out) * n_in) // n_out


def _cubic_weights(n_out: int, n_in: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] bicubic resampling matrix as torch's align_corners=False (border clamp)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    t = src - base
    weights = np.zeros((n_out, n_in))

    def kernel(x):
        x = np.abs(x)
        return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

    rows = np.arange(n_out)
    for offset in (-1, 0, 1, 2):
        np.add.at(weights, (rows, np.clip(base + offset, 0, n_in - 1)), kernel(t - offset))
    return weights


def min_max(saliency: np.ndarray) -> np.ndarray:
    """The package's min_max_norm: a constant map is left as it is."""
    saliency = np.asarray(saliency, np.float64)
    lo, hi = saliency.min(), saliency.max()
    return saliency if lo == hi else (saliency - lo) / (hi - lo)


def soft_mask(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
    """m for the single-step metrics: min-max map, bicubic to the input size (not clipped, as in
    the package, so it may overshoot [0, 1] slightly; the image is clipped to u8 after)."""
    m = min_max(saliency)
    return _cubic_weights(height, m.shape[0]) @ m @ _cubic_weights(width, m.shape[1]).T


# --- single-step metrics -------------------------------------------------------------------------

def _per_score(change: np.ndarray, y: np.ndarray) -> np.ndarray:
    """change / Y, and 0 where Y is 0 (a class the model gives no probability cannot drop; the
    division gave NaN, which spoiled every mean it entered)."""
    return np.divide(change, y, out=np.zeros_like(change), where=y > 0)


def average_drop(original, explanation) -> float:
    """AD = mean max(0, Y - O) / Y over images (Y: score on x, O: on the explanation image)."""
    y, o = np.asarray(original, np.float64), np.asarray(explanation, np.float64)
    return float(np.mean(_per_score(np.maximum(y - o, 0), y)))


def increase_in_confidence(original, explanation) -> float:
    """IIC = mean 1[O > Y] over images."""
    y, o = np.asarray(original, np.float64), np.asarray(explanation, np.float64)
    return float(np.mean(o > y))


def average_drop_in_deletion(original, deleted) -> float:
    """ADD = mean (Y - D) / Y over images, D on the image with the salient part removed."""
    y, d = np.asarray(original, np.float64), np.asarray(deleted, np.float64)
    return float(np.mean(_per_score(y - d, y)))


@dataclass(frozen=True)
class SingleStepScores:
    original: float      # Y: score of the class on x
    explanation: float   # O: on x * m + b * (1 - m)
    deleted: float       # D: on x * (1 - m) + b * m

    @property
    def average_drop(self) -> float:
        return average_drop([self.original], [self.explanation])

    @property
    def increase_in_confidence(self) -> float:
        return increase_in_confidence([self.original], [self.explanation])

    @property
    def average_drop_in_deletion(self) -> float:
        return average_drop_in_deletion([self.original], [self.deleted])


def single_step_images(image: np.ndarray, saliency: np.ndarray,
                       settings: FaithfulnessSettings) -> np.ndarray:
    """u8 [3, H, W, 3]: x, the explanation image and the deletion image."""
    h, w = image.shape[:2]
    m = soft_mask(saliency, h, w)[..., None]
    x = image.astype(np.float64)
    b = substrate(image, settings.single_step_substrate, settings)
    return _to_u8(np.stack([x, x * m + b * (1 - m), x * (1 - m) + b * m]))


def single_step(image: np.ndarray, saliency: np.ndarray, class_id: int, score_fn: ScoreFn,
                settings: FaithfulnessSettings = FaithfulnessSettings()) -> SingleStepScores:
    """One batched call of three images for AD, IIC and ADD."""
    images = single_step_images(image, saliency, settings)
    y, o, d = _score_in_chunks(images, 3, class_id, score_fn, settings.batch_size)
    return SingleStepScores(float(y), float(o), float(d))


# --- multi-step metrics --------------------------------------------------------------------------

def auc(scores: np.ndarray) -> float:
    """Trapezoid area of scores on evenly spaced points of [0, 1]."""
    scores = np.asarray(scores, np.float64)
    return float(np.trapezoid(scores, np.arange(len(scores)) / (len(scores) - 1)))


def correlation(score_changes: np.ndarray, saliency_means: np.ndarray) -> float:
    """Pearson correlation (DC / IC); NaN when either side is constant."""
    a, b = np.asarray(score_changes, np.float64), np.asarray(saliency_means, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def step_bounds(cells: int, steps: int) -> np.ndarray:
    """Cell counts removed after each step, 0 first: steps+1 increasing integers to `cells`."""
    n = min(steps, cells)
    return np.rint(np.linspace(0, cells, n + 1)).astype(int)


@dataclass(frozen=True)
class Curve:
    """Class score after each step (scores[0]: before any), the mean saliency of the cells each
    step changed, the AUC and the correlation of the score changes with those means."""

    kind: str
    scores: np.ndarray
    saliency_means: np.ndarray
    auc: float
    correlation: float

    @property
    def fractions(self) -> np.ndarray:
        return np.arange(len(self.scores)) / (len(self.scores) - 1)


def curve_images(image: np.ndarray, saliency: np.ndarray, kind: str,
                 settings: FaithfulnessSettings):
    """(mean saliency of the cells each step changes, image count, a generator of the curve's
    u8 images: steps + 1, the first unperturbed), so images are made one chunk at a time."""
    h, w = image.shape[:2]
    mh, mw = saliency.shape
    flat = np.asarray(saliency, np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    bounds = step_bounds(flat.size, settings.steps)
    means = np.array([flat[order[a:b]].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    rows, cols = _nearest_indices(h, mh), _nearest_indices(w, mw)
    x = image.astype(np.float64)
    name = settings.deletion_substrate if kind == "deletion" else settings.insertion_substrate
    b = substrate(image, name, settings)
    start, end = (x, b) if kind == "deletion" else (b, x)

    def generate():
        changed = np.zeros(flat.size, bool)
        for count in bounds:
            changed[order[:count]] = True
            m = changed.reshape(mh, mw)[rows][:, cols][..., None]
            yield _to_u8(np.where(m, end, start))

    return means, len(bounds), generate()


def deletion_insertion(image: np.ndarray, saliency: np.ndarray, class_id: int,
                       score_fn: ScoreFn, kind: str = "deletion",
                       settings: FaithfulnessSettings = FaithfulnessSettings()) -> Curve:
    """Deletion (replace cells with the substrate, most salient first; lower AUC is better) or
    insertion (reveal cells of x on the substrate; higher is better). `saliency` is the map at
    its own resolution; cells are upsampled nearest to the image, as in the package."""
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind {kind!r}: expected 'deletion' or 'insertion'")
    means, count, images = curve_images(image, saliency, kind, settings)
    scores = _score_in_chunks(images, count, class_id, score_fn, settings.batch_size)
    changes = scores[:-1] - scores[1:] if kind == "deletion" else scores[1:] - scores[:-1]
    return Curve(kind, scores, means, auc(scores), correlation(changes, means))


# --- by name: what a request asks for ------------------------------------------------------------

# metric name -> (family, how to read the number off the family's result)
METRICS: dict[str, tuple[str, Callable]] = {
    "deletion_auc": ("deletion", lambda r: r.auc),
    "deletion_correlation": ("deletion", lambda r: r.correlation),
    "insertion_auc": ("insertion", lambda r: r.auc),
    "insertion_correlation": ("insertion", lambda r: r.correlation),
    "average_drop": ("single_step", lambda r: r.average_drop),
    "increase_in_confidence": ("single_step", lambda r: r.increase_in_confidence),
    "average_drop_in_deletion": ("single_step", lambda r: r.average_drop_in_deletion),
}
METRIC_NAMES = tuple(METRICS)


@dataclass(frozen=True)
class MetricValue:
    """One response entry: a number (or, for a categorical result, `text`) and the parameters
    that reproduce it."""

    name: str
    value: float
    parameters: dict[str, str]
    text: str = ""


def compute(names: Iterable[str], image: np.ndarray, saliency: np.ndarray, class_id: int,
            score_fn: ScoreFn, settings: FaithfulnessSettings = FaithfulnessSettings()
            ) -> list[MetricValue]:
    """The named faithfulness metrics for one image and map, each family computed once."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown faithfulness metric {name!r}: expected one of "
                             f"{', '.join(METRIC_NAMES)}")
    families: dict[str, object] = {}
    for family in dict.fromkeys(METRICS[n][0] for n in names):
        if family == "single_step":
            families[family] = single_step(image, saliency, class_id, score_fn, settings)
        else:
            families[family] = deletion_insertion(image, saliency, class_id, score_fn, family,
                                                  settings)
    out = []
    for name in names:
        family, read = METRICS[name]
        params = {**settings.as_parameters(family, image.shape[0]), "class_id": str(class_id),
                  "input": f"{image.shape[1]}x{image.shape[0]}",
                  "map": f"{saliency.shape[1]}x{saliency.shape[0]}"}
        result = families[family]
        if family != "single_step":
            params["steps"] = str(len(result.scores) - 1)
        out.append(MetricValue(name, float(read(result)), params))
    return out
