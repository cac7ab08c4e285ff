"""Run `evaluate_items` over a whole data set: locally in chunks, or on Ray.

Ray: `ray.data` over the image files, `map_batches` with a callable class that opens one backend
(one compiled model) per worker and calls the same `evaluate_items` as the local loop. Results
come back as JSON text (floats round-trip exactly), so both paths give identical numbers.
Workers read the image files and the model by path: on a cluster, those paths must be on a
shared file system and xaiserve installed on every node.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .dataset import DatasetItem
from .eval_backend import BackendSpec
from .evaluation import EvaluationSettings, ImageResult, evaluate_items

Progress = Callable[[int], None]  # called with the number of images just finished


class EvaluationInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C during a run: the images evaluated before it, by their index in the
    items, so that a report of them can still be written."""

    def __init__(self, reason: str, results: dict[int, ImageResult]):
        super().__init__(reason)
        self.reason, self.results = reason, results


def evaluate_local(spec: BackendSpec, items: list[DatasetItem], settings: EvaluationSettings,
                   batch_size: int = 16, progress: Progress = lambda _: None,
                   backend=None) -> list[ImageResult]:
    backend = backend or spec.open()
    results: list[ImageResult] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results.extend(evaluate_items(backend, chunk, settings))
            progress(len(chunk))
    except KeyboardInterrupt as exc:
        raise EvaluationInterrupted(str(exc) or "SIGINT", dict(enumerate(results))) from None
    return results


class RayEvaluator:
    """One per Ray worker: opens the model once, evaluates batches of items."""

    def __init__(self, spec: BackendSpec, settings: EvaluationSettings):
        self.backend = spec.open()
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        items = [DatasetItem.from_dict(json.loads(text)) for text in batch["item"]]
        results = evaluate_items(self.backend, items, self.settings)
        return {"index": np.asarray(batch["index"]),
                "result": np.asarray([json.dumps(r.to_json()) for r in results], dtype=object)}


def evaluate_ray(spec: BackendSpec, items: list[DatasetItem], settings: EvaluationSettings,
                 address: str, workers: int = 2, batch_size: int = 8,
                 progress: Progress = lambda _: None) -> list[ImageResult]:
    """`address`: "local" starts a Ray instance in this process; "auto" or "ray://host:port"
    joins a cluster. An already initialised Ray (a test's `ray.init`) is used as it is."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the one progress bar
    dataset = ray.data.from_items([{"index": i, "item": json.dumps(item.as_dict())}
                                   for i, item in enumerate(items)])
    evaluated = dataset.map_batches(
        RayEvaluator, fn_constructor_kwargs={"spec": spec, "settings": settings},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
        batch_format="numpy", num_cpus=1)
    by_index: dict[int, ImageResult] = {}
    try:
        for row in evaluated.iter_rows():
            by_index[int(row["index"])] = ImageResult.from_json(json.loads(row["result"]))
            progress(1)
    except KeyboardInterrupt as exc:
        raise EvaluationInterrupted(str(exc) or "SIGINT", by_index) from None
    return [by_index[i] for i in range(len(items))]
