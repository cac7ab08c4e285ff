"""A served classifier with a clear lifecycle: load, preprocess, predict, explain.

One object per model version. Inference goes through OpenVINO's async infer-request pool, so
several callers can use one compiled model at once without a global lock.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from .images import resize_for_model
from .model_info import ModelInfo

SALIENCY_OUTPUT = "saliency_map"

# pybind11's one-time numpy setup inside OpenVINO can deadlock when several threads reach it
# at once (seen with concurrent first inferences); touching a tensor's data here, at import on
# one thread, runs it before any request thread exists. Warm-ups are serialised for the same
# reason, since models load in parallel threads.
ov.Tensor(np.zeros((1,), np.uint8)).data
_WARM_UP_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Prediction:
    class_id: int
    label: str
    score: float


@dataclass
class Explanation:
    """Predictions for one image and one saliency map per target class (float, [h, w], 0..1)."""

    predictions: list[Prediction]
    maps: dict[int, np.ndarray]
    probabilities: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


class ClassifierModel:
    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None,
                 core: ov.Core | None = None):
        self.path = Path(path)
        self.device = device
        self.config = config or {}
        self.core = core or ov.Core()
        self.compiled: ov.CompiledModel | None = None
        self.info: ModelInfo | None = None

    def load(self) -> "ClassifierModel":
        xml = self.path if self.path.suffix == ".xml" else self.path / "model.xml"
        try:
            model = self.core.read_model(str(xml))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{xml}: cannot read the IR ({str(exc).splitlines()[0][:160]})") \
                from None
        info = ModelInfo.from_model(model)
        if info is None or not info.embedded_processing:
            raise ModelLoadError(f"{xml}: no embedded preprocessing in model_info; export it with "
                                 "`xaiserve export`")
        self.info = info
        self.compiled = self.core.compile_model(model, self.device, self.config)
        self.output_names = {name for out in self.compiled.outputs for name in out.get_names()}
        # Twice the optimal number, so each stream has a request queued while a handler thread
        # copies the previous outputs: without it streams sit idle between requests.
        optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.num_requests = 2 * max(1, optimal)
        self._infer_requests: queue.Queue = queue.Queue()
        for _ in range(self.num_requests):
            self._infer_requests.put(self.compiled.create_infer_request())
        self._warm_up()
        return self

    def _warm_up(self) -> None:
        """One inference on one thread before any request: the first calls of several threads
        at once can hang in OpenVINO 2026.4, and the first call is slow anyway."""
        info = self.info
        with _WARM_UP_LOCK, self.infer_request() as request:
            request.infer({0: np.zeros((1, info.input_height, info.input_width, 3), np.uint8)})

    @contextmanager
    def infer_request(self, timings: dict[str, float] | None = None):
        """Borrow one of the model's infer requests (a pool sized by OpenVINO's optimal number):
        callers on different requests run in parallel; no lock is held while inferring. The wait
        for a free one goes into `timings["queue"]` (ms), so a caller can report it apart."""
        t = time.perf_counter()
        request = self._infer_requests.get()
        if timings is not None:
            timings["queue"] = timings.get("queue", 0.0) + (time.perf_counter() - t) * 1e3
        try:
            yield request
        finally:
            self._infer_requests.put(request)

    @property
    def has_saliency(self) -> bool:
        return SALIENCY_OUTPUT in self.output_names

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return resize_for_model(image, self.info)

    def predict(self, batch: np.ndarray, outputs: tuple[str, ...] | None = None,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """u8 [N, H, W, 3] -> {"logits": [N, K], "saliency_map": [N, K, h, w] if present};
        `outputs` limits what is copied out of the infer request. `timings` (ms) gets "queue"
        (waiting for a free infer request) and "inference" (the rest) added to it."""
        wanted = outputs or (("logits", SALIENCY_OUTPUT) if self.has_saliency else ("logits",))
        with self.infer_request(timings) as request:
            t_run = time.perf_counter()
            request.infer({0: batch})
            result = {name: request.get_tensor(name).data.copy() for name in wanted}
        if timings is not None:
            timings["inference"] = timings.get("inference", 0.0) + \
                (time.perf_counter() - t_run) * 1e3
        return result

    def explain(self, image: np.ndarray, top_k: int = 1) -> Explanation:
        t0 = time.perf_counter()
        tensor = self.preprocess(image)[None]
        t1 = time.perf_counter()
        stages: dict[str, float] = {}
        out = self.predict(tensor, timings=stages)
        t2 = time.perf_counter()
        probs = softmax(out["logits"][0].astype(np.float64))
        order = np.argsort(-probs)[:max(top_k, 1)]
        predictions = [Prediction(int(c), self.label(int(c)), float(probs[c])) for c in order]
        maps = {}
        if self.has_saliency:
            saliency = out[SALIENCY_OUTPUT][0]
            for c in order[:top_k]:
                maps[int(c)] = saliency[int(c) if saliency.shape[0] > 1 else 0]
        return Explanation(predictions, maps, probs, {
            "preprocess": (t1 - t0) * 1e3, "queue": stages["queue"],
            "inference": (t2 - t1) * 1e3 - stages["queue"],
        })

    def label(self, class_id: int) -> str:
        labels = self.info.labels
        return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)
