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
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class VersionStatistics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._success, self._fail = Duration(), Duration()
        self._queue, self._input, self._infer, self._output = (Duration(), Duration(),
                                                               Duration(), Duration())

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
                self._fail.add(time.perf_counter_ns() - start)
            raise
        self._record(split, time.perf_counter_ns() - start)

    def _record(self, split: RequestSplit, total_ns: int) -> None:
        ms = split.timings_ms
        to_ns = 1e6
        input_ns = int(sum(ms.get(k, 0.0) for k in INPUT_STAGES) * to_ns)
        queue_ns = int(ms.get(QUEUE_STAGE, 0.0) * to_ns)
        infer_ns = int(ms.get(INFER_STAGE, 0.0) * to_ns)
        with self._lock:
            self._inference_count += split.images
            self._execution_count += 1
            self._last_inference_ms = int(time.time() * 1e3)
            self._success.add(total_ns)
            self._input.add(input_ns)
            self._queue.add(queue_ns)
            self._infer.add(infer_ns)
            self._output.add(total_ns - input_ns - queue_ns - infer_ns)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            copy = [Duration(d.count, d.ns) for d in (self._success, self._fail, self._queue,
                                                      self._input, self._infer, self._output)]
            return StatisticsSnapshot(self._inference_count, self._execution_count,
                                      self._last_inference_ms, *copy)
