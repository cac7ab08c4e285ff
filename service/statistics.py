"""Cumulative per-version statistics, in the shape of Triton's ModelStatistics RPC.

perf_analyzer reads them before and after each measurement window and prints the server's share
of a request (queue, compute input, compute infer, compute output) beside what its client saw;
`xaiserve bench --server` and dashboards can read them the same way. Counters only grow; a
short lock per version guards them (never held during inference).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

# The request stages (keys of a handler's timings in ms) that make up Triton's buckets; what is
# left of the total after them (maps, metrics, encoding the response) counts as compute_output.
INPUT_STAGES = ("decode", "preprocess")
QUEUE_STAGE = "queue"
INFER_STAGE = "inference"
# Triton's InferStatistics fields, in its order.
BUCKETS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
           "cache_hit", "cache_miss")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)


@dataclass
class RequestSplit:
    """Filled by a handler while it runs: images inferred and its stage timings in ms."""

    images: int = 1
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class StatisticsSnapshot:
    inference_count: int  # images
    execution_count: int  # requests that ran
    last_inference_ms: int  # since the epoch; 0: never
    durations: dict[str, Duration]  # by BUCKETS name


class VersionStatistics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._durations = {name: Duration() for name in BUCKETS}

    @contextmanager
    def measure(self) -> Iterator[RequestSplit]:
        """Around one request to this version: a success adds its split, an exception (a bad
        request or a failed inference) counts as a failure with its duration."""
        start = time.perf_counter_ns()
        split = RequestSplit()
        try:
            yield split
        except BaseException:
            with self._lock:
                self._durations["fail"].add(time.perf_counter_ns() - start)
            raise
        self._record(split, time.perf_counter_ns() - start)

    def _record(self, split: RequestSplit, total_ns: int) -> None:
        ms = split.timings_ms
        parts = {"compute_input": sum(ms.get(k, 0.0) for k in INPUT_STAGES),
                 "queue": ms.get(QUEUE_STAGE, 0.0), "compute_infer": ms.get(INFER_STAGE, 0.0)}
        parts_ns = {name: int(value * 1e6) for name, value in parts.items()}
        parts_ns["compute_output"] = total_ns - sum(parts_ns.values())
        parts_ns["success"] = total_ns
        with self._lock:
            self._inference_count += split.images
            self._execution_count += 1
            self._last_inference_ms = int(time.time() * 1e3)
            for name, ns in parts_ns.items():
                self._durations[name].add(ns)

    def record_cache_hit(self, images: int, ns: int) -> None:
        """A request answered from the response cache: a success and a hit, its images
        counted as inferred (as Triton counts them), no execution."""
        with self._lock:
            self._inference_count += images
            self._last_inference_ms = int(time.time() * 1e3)
            self._durations["success"].add(ns)
            self._durations["cache_hit"].add(ns)

    def record_cache_miss(self, ns: int) -> None:
        """The lookup and the keeping of a request computed because it was not cached."""
        with self._lock:
            self._durations["cache_miss"].add(ns)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return StatisticsSnapshot(
                self._inference_count, self._execution_count, self._last_inference_ms,
                {name: Duration(d.count, d.ns) for name, d in self._durations.items()})
