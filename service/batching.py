"""Opportunistic batching: requests that wait for a busy model are run together.

A request never waits to be batched. Each of a few dispatcher threads owns one infer request;
when it is free it takes the oldest waiting request and every other one that waits behind it
(up to `max_images`), runs them as one batch and hands each caller its rows. At low load that
is one image per inference, as before; under load the streams run batches, which costs less per
image than the same images one by one (the runtime's fixed cost per inference, and better use of
the cores), the way dynamic batching works in Triton.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import openvino as ov


def add_timings(timings: dict[str, float] | None, asked: float, started: float,
                ended: float) -> None:
    """Accumulate "queue" (asked -> started) and "inference" (started -> ended) in ms."""
    if timings is not None:
        timings["queue"] = timings.get("queue", 0.0) + (started - asked) * 1e3
        timings["inference"] = timings.get("inference", 0.0) + (ended - started) * 1e3


@dataclass
class _Job:
    batch: np.ndarray
    outputs: tuple[str, ...]
    asked: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    ended: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class BatchingPool:
    """Drop-in for `InferPool.run` on a compiled model with a dynamic batch dimension."""

    def __init__(self, compiled: ov.CompiledModel, dispatchers: int, max_images: int = 8,
                 name: str = "model"):
        self.compiled = compiled
        self.size = dispatchers
        self.max_images = max_images
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Orders `run`'s enqueue against `close`'s stop signals, so no job can be queued behind
        # the dispatchers' exit and never answered.
        self._closing = threading.Lock()
        self._closed = False
        self.inferences = 0  # counters for tests and metrics: images / inferences = mean batch
        self.images = 0
        self._threads = [threading.Thread(target=self._dispatch, args=(compiled.create_infer_request(),),
                                          name=f"batch-{name}-{i}", daemon=True)
                         for i in range(dispatchers)]
        for thread in self._threads:
            thread.start()

    def run(self, batch: np.ndarray, outputs: tuple[str, ...],
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """`timings` gets "queue" (until the job's batch starts) and "inference" (the batch)."""
        job = _Job(batch, outputs)
        with self._closing:
            queued = not self._closed
            if queued:
                self._jobs.put(job)
        if not queued:  # an unloaded version finishing a late request: run it here
            self._run_group(self.compiled.create_infer_request(), [job])
        job.done.wait()
        if job.error is not None:
            raise job.error
        add_timings(timings, job.asked, job.started, job.ended)
        return job.result

    def close(self) -> None:
        """Let the dispatchers finish the queued jobs and exit."""
        with self._closing:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)

    # --- dispatcher side ----------------------------------------------------------------------

    def _take_group(self, first: _Job) -> tuple[list[_Job], list[_Job]]:
        """The first job and the waiting ones that fit beside it; jobs asking for other outputs
        are handed back to the queue's next reader."""
        group, other = [first], []
        images = len(first.batch)
        while images < self.max_images:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                other.append(job)
                break
            if job.outputs == first.outputs and images + len(job.batch) <= self.max_images:
                group.append(job)
                images += len(job.batch)
            else:
                other.append(job)
        return group, other

    def _dispatch(self, request: ov.InferRequest) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            group, other = self._take_group(job)
            for job in other:
                self._jobs.put(job)
            self._run_group(request, group)

    def _run_group(self, request: ov.InferRequest, group: list[_Job]) -> None:
        started = time.perf_counter()
        for job in group:
            job.started = started
        try:
            batch = group[0].batch if len(group) == 1 else np.concatenate([j.batch for j in group])
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True, share_outputs=True)
            self.inferences += 1
            self.images += len(batch)
            start = 0
            for job in group:
                rows = slice(start, start + len(job.batch))
                job.result = {name: request.get_tensor(name).data[rows].copy()
                              for name in job.outputs}
                start = rows.stop
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for job in group:
                job.error = exc
        finally:
            ended = time.perf_counter()
            for job in group:
                job.ended = ended
                job.done.set()
