"""The timing every benchmark here shares: inferences back to back (batch 1 unless asked),
models alternated in short rounds. No xaiserve import, so that benchmarks/int8_on_host.py can
use it on a host with only openvino installed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import openvino as ov


@dataclass
class Timing:
    """Latency figures of one model in one precision, from our loop or from benchmark_app."""

    p50_ms: float
    mean_ms: float
    fps: float
    count: int
    min_ms: float | None = None
    max_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    round_p50_ms: list[float] | None = None  # our loop only: the median of each round
    cpu_ms: float | None = None  # our loop only: process CPU time per inference, all threads


def batched_request(core: ov.Core, model: ov.Model, config: dict,
                    images: np.ndarray) -> ov.InferRequest:
    """An infer request of `model` reshaped to the u8 NHWC batch `images` [N, H, W, 3], which
    it holds."""
    model = model.clone()
    model.reshape({"image": ov.PartialShape(list(images.shape))})
    request = core.compile_model(model, "CPU", config).create_infer_request()
    request.set_tensor("image", ov.Tensor(np.ascontiguousarray(images)))
    return request


def batch1_request(core: ov.Core, model: ov.Model, config: dict,
                   image: np.ndarray) -> ov.InferRequest:
    """An infer request of `model` reshaped to one u8 NHWC `image` [H, W, 3], which it holds."""
    return batched_request(core, model, config, image[None])


def run_for(request: ov.InferRequest, seconds: float) -> list[float]:
    """Synchronous inferences back to back for `seconds`; latencies in ms."""
    latencies = []
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        request.infer()
        now = time.perf_counter()
        latencies.append((now - t) * 1e3)
        if now >= end:
            return latencies


def summarize(latencies: list[float], window_s: float,
              round_p50: list[float] | None = None, cpu_s: float | None = None) -> Timing:
    ordered = sorted(latencies)
    return Timing(
        p50_ms=statistics.median(ordered), mean_ms=statistics.fmean(ordered),
        fps=len(ordered) / window_s, count=len(ordered),
        min_ms=ordered[0], max_ms=ordered[-1], p10_ms=ordered[len(ordered) // 10],
        p90_ms=ordered[len(ordered) * 9 // 10],
        round_p50_ms=round_p50,
        cpu_ms=None if cpu_s is None else cpu_s * 1e3 / len(ordered),
    )


def measure_interleaved(requests: dict[str, ov.InferRequest], warmup_s: float,
                        seconds: float, rounds: int) -> dict[str, Timing]:
    """Warm each model up, then run them in order, in reverse order, in order, ... for `rounds`
    rounds of `seconds / rounds` each, so that each model gets `seconds` of measurement. Short
    rounds make load from other processes hit both models alike."""
    for request in requests.values():
        run_for(request, warmup_s)
    latencies: dict[str, list[float]] = {v: [] for v in requests}
    round_p50: dict[str, list[float]] = {v: [] for v in requests}
    busy: dict[str, float] = {v: 0.0 for v in requests}
    cpu: dict[str, float] = {v: 0.0 for v in requests}
    slice_s = seconds / rounds
    for r in range(rounds):
        order = list(requests) if r % 2 == 0 else list(reversed(requests))
        for variant in order:
            c, t = time.process_time(), time.perf_counter()
            these = run_for(requests[variant], slice_s)
            busy[variant] += time.perf_counter() - t
            cpu[variant] += time.process_time() - c
            latencies[variant] += these
            round_p50[variant].append(statistics.median(these))
    return {v: summarize(latencies[v], busy[v], round_p50[v], cpu[v]) for v in requests}
