"""OpenVINO's benchmark_app on an IR: the runtime's own limit that every bench figure is divided by.

benchmark_app runs the compiled model with nothing around it (no decoding, no Python request
handling, no gRPC), so ours / benchmark_app says how much of the ceiling a user still gets.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# benchmark_app's -infer_precision names, by our precision names ("default": leave it out).
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


@dataclass
class ReferenceRun:
    """One benchmark_app run: what it was asked and what it reported (FPS in images/s)."""

    xml: str
    device: str
    hint: str
    batch: int
    seconds: int
    fps: float
    p50_ms: float
    mean_ms: float
    iterations: int
    duration_ms: float
    infer_requests: int | None
    streams: int | None
    precision: str = "default"
    requested_streams: str = "auto"
    command: list[str] = field(default_factory=list)


def benchmark_app_command() -> list[str]:
    """The `benchmark_app` entry point beside this Python, else its function run by this Python
    (the wheel's module has no `__main__` guard, so `python -m` would print nothing)."""
    beside = Path(sys.executable).parent / "benchmark_app"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; "
            "sys.argv[0] = 'benchmark_app'; sys.exit(main())"]


def parse_benchmark_app(text: str) -> dict:
    """Count, Duration, Latency Median/Average, Throughput, nireq and streams from its report."""
    def number(pattern: str) -> float | None:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else None

    values = {
        "iterations": number(r"Count:\s+(\d+) iterations"),
        "duration_ms": number(r"Duration:\s+([\d.]+) ms"),
        "p50_ms": number(r"Median:\s+([\d.]+) ms"),
        "mean_ms": number(r"Average:\s+([\d.]+) ms"),
        "fps": number(r"Throughput:\s+([\d.]+) FPS"),
        # the LATENCY hint makes it call one request synchronously, saying so
        "infer_requests": number(r"asynchronously, (\d+) inference requests")
        or (1.0 if "Start inference synchronously" in text else None),
        "streams": number(r"^\[ INFO \]\s+NUM_STREAMS: (\d+)"),
    }
    missing = [k for k in ("iterations", "duration_ms", "p50_ms", "fps") if values[k] is None]
    if missing:
        raise ValueError(f"benchmark_app output has no {missing}")
    return values


def run_benchmark_app(xml: Path, *, hint: str, batch: int, seconds: int, device: str = "CPU",
                      input_name: str = "image", input_hw: tuple[int, int] = (224, 224),
                      precision: str = "default", streams: str = "auto",
                      timeout_s: float | None = None) -> ReferenceRun:
    """benchmark_app with a static u8 [batch, H, W, 3] input; its FPS counts images."""
    shape = ",".join(str(d) for d in (batch, *input_hw, 3))
    cmd = [*benchmark_app_command(), "-m", str(xml), "-d", device, "-hint", hint.lower(),
           "-t", str(seconds), "-shape", f"{input_name}[{shape}]"]
    if precision in PRECISIONS:
        cmd += ["-infer_precision", PRECISIONS[precision]]
    if streams != "auto":
        cmd += ["-nstreams", str(streams)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout_s or seconds + 180)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"benchmark_app exit {proc.returncode}: {tail}")
    v = parse_benchmark_app(proc.stdout)
    # benchmark_app reports images/s when it finds the batch dimension; check it did.
    per_iteration = v["iterations"] / v["duration_ms"] * 1e3
    fps = v["fps"] if abs(v["fps"] - per_iteration * batch) < 0.05 * v["fps"] else \
        per_iteration * batch
    return ReferenceRun(
        str(xml), device, hint, batch, seconds, fps, v["p50_ms"], v["mean_ms"] or v["p50_ms"],
        int(v["iterations"]), v["duration_ms"],
        None if v["infer_requests"] is None else int(v["infer_requests"]),
        None if v["streams"] is None else int(v["streams"]), precision, str(streams), cmd)
