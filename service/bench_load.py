"""The load of one bench point: client threads calling back to back, completed requests counted
in consecutive windows until perf_analyzer's stability rule holds, and the split of a request's
time into its stages."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from . import bench_works as works
from .bench_settings import BenchError, BenchSettings
from .model import error_reason

# The request split, in the order a request goes through them.
STAGES = ("decode", "preprocess", "queue", "inference", "explanation", "encode_maps", "metrics",
          "other", "transport")


@dataclass
class Sample:
    end: float
    latency_ms: float
    stages: dict[str, float]


@dataclass
class Window:
    seconds: float
    requests: int
    throughput: float  # images/s
    p50_ms: float


def is_stable(windows: list[Window], tolerance: float, count: int) -> bool:
    """perf_analyzer's rule: the last `count` windows' throughput and p50 each lie within
    +-tolerance of their mean."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    for values in ([w.throughput for w in last], [w.p50_ms for w in last]):
        mean = float(np.mean(values))
        if not np.isfinite(mean) or mean <= 0:
            return False
        if max(values) > mean * (1 + tolerance) or min(values) < mean * (1 - tolerance):
            return False
    return True


@dataclass
class Measurement:
    windows: list[Window]
    samples: list[Sample]  # those of the accepted windows
    seconds: float  # their length
    stable: bool
    errors: int
    first_error: str


class PointFailed(BenchError):
    """No request of a point succeeded (at all, or for `give_up_s` after some did): the run
    goes on with the next point and says which one failed."""


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {error_reason(exc) if str(exc).strip() else ''}"


def measure(calls: list[works.Call], batch: int, settings: BenchSettings,
            on_window: Callable[[Window, int], None] | None = None) -> Measurement:
    """One client thread per call, back to back, until the windows are stable or capped.
    PointFailed when every request fails: from the start, or for settings.give_up_s after
    some succeeded (a server that died mid-run; its clients would otherwise retry forever)."""
    samples: list[Sample] = []
    errors: list[str] = []
    failing = [False] * len(calls)  # whether each client's latest request failed
    stop = threading.Event()

    def client(index: int, call: works.Call) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                stages = call()
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                errors.append(describe_error(exc))
                failing[index] = True
                time.sleep(0.05)
                continue
            end = time.perf_counter()
            failing[index] = False
            samples.append(Sample(end, (end - t) * 1e3, stages))

    threads = [threading.Thread(target=client, args=(i, c), daemon=True)
               for i, c in enumerate(calls)]
    for th in threads:
        th.start()

    def wait(until: Callable[[], bool]) -> None:
        while not until():
            if errors and not samples and len(errors) >= len(calls):
                raise PointFailed(f"every request failed: {errors[0]}")
            # A slow request still under way keeps its client off the failing list.
            since = time.perf_counter() - (samples[-1].end if samples else t_warm)
            if since >= settings.give_up_s and all(failing):
                raise PointFailed(f"every request failed for {settings.give_up_s:g} s after "
                                  f"{len(samples)} succeeded: {errors[-1]}")
            time.sleep(0.005)

    t_warm = time.perf_counter()
    try:
        # The warm-up lasts warmup_s and until every client has finished one request.
        wait(lambda: time.perf_counter() - t_warm >= settings.warmup_s
             and len(samples) >= len(calls))
        windows: list[Window] = []
        bounds: list[tuple[int, int, float]] = []
        while len(windows) < settings.max_windows:
            start, first = time.perf_counter(), len(samples)
            if settings.window_count:
                wait(lambda: len(samples) - first >= settings.window_count)
            else:  # a time window, stretched until each client can have finished one request
                wait(lambda: time.perf_counter() - start >= settings.window_s
                     and len(samples) - first >= len(calls))
            last, seconds = len(samples), time.perf_counter() - start
            latencies = [s.latency_ms for s in samples[first:last]]
            windows.append(Window(seconds, last - first, (last - first) * batch / seconds,
                                  float(np.percentile(latencies, 50))))
            bounds.append((first, last, seconds))
            stable = is_stable(windows, settings.stability, settings.stable_windows)
            if on_window:
                on_window(windows[-1], len(windows))
            if stable:
                break
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=600)
        for call in calls:  # a stream's client ends its stream
            getattr(call, "close", lambda: None)()
    kept = bounds[-settings.stable_windows:]
    return Measurement(windows, samples[kept[0][0]:kept[-1][1]], sum(b[2] for b in kept),
                       stable, len(errors), errors[0] if errors else "")


def request_split(samples: list[Sample], remote: bool) -> dict[str, float]:
    """Mean ms per stage, so the parts add up to the mean latency. Remote: the server's total
    against the client's latency gives `transport`; in-process the unaccounted rest is `other`."""
    split: dict[str, float] = {}
    for sample in samples:
        stages = dict(sample.stages)
        total = stages.pop("total", None)
        inside = sum(stages.values())
        if remote and total is not None:
            stages["other"] = max(0.0, total - inside)
            stages["transport"] = sample.latency_ms - total
        else:
            stages["other"] = max(0.0, sample.latency_ms - inside)
        for name, ms in stages.items():
            split[name] = split.get(name, 0.0) + ms
    order = {name: i for i, name in enumerate(STAGES)}
    return {k: split[k] / len(samples) for k in sorted(split, key=lambda k: order.get(k, 99))}
