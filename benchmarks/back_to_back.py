"""The timing loop every batch-1 benchmark here shares. No xaiserve import, so that
benchmarks/int8_on_host.py can use it on a host with only openvino installed."""

from __future__ import annotations

import time


def run_for(request, seconds: float) -> list[float]:
    """Synchronous inferences of an ov.InferRequest back to back for `seconds`; latencies in
    ms."""
    latencies = []
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        request.infer()
        now = time.perf_counter()
        latencies.append((now - t) * 1e3)
        if now >= end:
            return latencies
