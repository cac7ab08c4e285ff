"""Load test of `xaiserve serve` on loopback: a fixed number of clients for a fixed time.

Each client has its own channel and sends one kind of request without pause; the clients are
split between the kinds in proportion to --mix: predictions (KServe ModelInfer, u8 224x224),
white-box explanations (Explain, JPEG in, ReciproCAM map as floats) and black-box explanations
(Explain on the plain IR, RISE with few masks), all at once on one server. The server runs
as a subprocess with metrics and JSON logs on, as in production, and is stopped with SIGTERM
at the end.

Reported: requests and throughput per kind, latency percentiles, errors by status code (zero
expected), and the server's resident memory (RSS) before load, after a warm-up, and at the end:
growth after warm-up must stay bounded (a leak shows as a steady slope). The client counts are
checked against the server's own Prometheus counters.

    .venv/bin/python benchmarks/load_test.py                       # 60 s, 8 clients
    .venv/bin/python benchmarks/load_test.py --duration 20 --clients 4

Writes bench-out/load_test.json and bench-out/load_test.png (RSS and throughput over time).
On a small shared machine the throughput says little by itself; errors and memory are the point.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_speed import (PLAIN_MODEL, SALIENCY_MODEL, ServerProcess,  # noqa: E402
                           channel, ensure_models, explain_call, log, predict_call, sample_jpeg)

from xaiserve.service.proto import xaiserve_pb2 as xpb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("predict", "white_box", "black_box")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in KINDS:
            raise SystemExit(f"--mix: {kind!r} is not one of {', '.join(KINDS)}")
        mix[kind] = float(weight)
    return mix


class Recorder:
    """Completions (time, kind, latency) and failures (kind, code), from all client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # client side only: the server holds no such lock
        self.done: list[tuple[float, str, float]] = []
        self.failed: list[tuple[float, str, str]] = []

    def ok(self, kind: str, latency: float) -> None:
        with self.lock:
            self.done.append((time.monotonic(), kind, latency))

    def error(self, kind: str, code: str) -> None:
        with self.lock:
            self.failed.append((time.monotonic(), kind, code))


def client_kinds(mix: dict[str, float], clients: int) -> list[str]:
    """Clients per kind in proportion to the mix (largest remainder), at least one each: a
    client waiting on a slow black-box call would otherwise stall its fast requests too."""
    total = sum(mix.values())
    wanted = {k: clients * w / total for k, w in mix.items() if w > 0}
    counts = {k: max(1, int(v)) for k, v in wanted.items()}
    for k in sorted(wanted, key=lambda k: wanted[k] - counts[k], reverse=True):
        if sum(counts.values()) >= clients:
            break
        counts[k] += 1
    return [k for k in KINDS for _ in range(counts.get(k, 0))]


def run_clients(address: str, image: bytes, args, kinds: list[str], until: float,
                recorder: Recorder) -> None:
    def client(kind: str) -> None:
        with channel(address) as ch:
            calls = {
                "predict": predict_call(ch, SALIENCY_MODEL),
                "white_box": explain_call(ch, image, xpb.MAP_FORMAT_FLOAT, xpb.METHOD_WHITE_BOX,
                                          SALIENCY_MODEL),
                "black_box": explain_call(ch, image, xpb.MAP_FORMAT_FLOAT, xpb.METHOD_BLACK_BOX,
                                          PLAIN_MODEL, masks=args.masks, seed=args.seed),
            }
            while time.monotonic() < until:
                start = time.monotonic()
                try:
                    calls[kind]()
                except grpc.RpcError as exc:
                    recorder.error(kind, exc.code().name)
                    continue
                recorder.ok(kind, time.monotonic() - start)

    threads = [threading.Thread(target=client, args=(kind,)) for kind in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def sample_memory(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    while not stop.wait(1.0):
        samples.append((time.monotonic(), rss_mb(pid)))


def server_counts(metrics_port: int) -> dict[str, float]:
    """xaiserve_requests_total summed by (method, code), from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)\
        .read().decode()
    counts: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name == "xaiserve_requests":
            for s in family.samples:
                if s.name == "xaiserve_requests_total":
                    counts[f"{s.labels['method']} {s.labels['code']}"] += s.value
    return dict(counts)


def summarise(recorder: Recorder, start: float, end: float) -> dict:
    """Answers that arrived between the end of the warm-up and the end of the run."""
    seconds = end - start
    done = [d for d in recorder.done if start <= d[0] <= end]
    failed = [f for f in recorder.failed if start <= f[0] <= end]
    kinds = {}
    for kind in KINDS:
        latencies = np.array([lat for _, k, lat in done if k == kind]) * 1e3
        kinds[kind] = {
            "requests": int(latencies.size),
            "per_second": round(latencies.size / seconds, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
            "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies.size else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies.size else None,
        }
    return {"seconds": round(seconds, 1), "requests": len(done),
            "per_second": round(len(done) / seconds, 2), "kinds": kinds,
            "errors": len(failed),
            "errors_by_code": dict(Counter(f"{k} {c}" for _, k, c in failed))}


def memory_summary(samples: list[tuple[float, float]], before: float, start: float,
                   until: float) -> dict:
    """RSS before load, after the warm-up, half-way and at the end. Allocator pools and caches
    fill during the first part of a run; a leak keeps growing in the second half too."""
    def at(t: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - t))[1]

    warm, half, end = at(start), at((start + until) / 2), at(until)
    second = [(t, m) for t, m in samples if (start + until) / 2 <= t <= until]
    slope = (float(np.polyfit([t for t, _ in second], [m for _, m in second], 1)[0]) * 60
             if len(second) > 5 else float("nan"))
    return {"rss_before_load_mb": round(before, 1), "rss_after_warmup_mb": round(warm, 1),
            "rss_half_way_mb": round(half, 1), "rss_end_mb": round(end, 1),
            "rss_max_mb": round(max(m for _, m in samples), 1),
            "growth_after_warmup_mb": round(end - warm, 1),
            "growth_second_half_mb": round(end - half, 1),
            "second_half_slope_mb_per_minute": round(slope, 2)}


def plot(path: Path, samples, recorder: Recorder, t0: float, start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([t - t0 for t, _ in samples], [m for _, m in samples])
    top.set_ylabel("server RSS (MB)")
    top.axvline(start - t0, color="grey", linestyle="--", label="end of warm-up")
    top.legend()
    for kind in KINDS:
        times = np.array([t - t0 for t, k, _ in recorder.done if k == kind])
        if times.size:
            edges = np.arange(0, times.max() + 2, 2.0)
            counts, _ = np.histogram(times, edges)
            bottom.plot(edges[:-1] + 1, counts / 2.0, label=kind)
    bottom.set_ylabel("answers per second")
    bottom.set_xlabel("seconds since start")
    bottom.legend()
    fig.suptitle("xaiserve load test (loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    mix = parse_mix(args.mix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ensure_models(args.repository, False)
    server = ServerProcess(args.repository, "load", [
        "--metrics-port", "0", "--log-format", "json",
        "--max-concurrent-requests", str(max(32, 2 * args.clients))],
        args.out.with_name("load_test_server.log"))
    server.start()
    try:
        text = server.log_path.read_text()
        metrics_port = int(re.search(r"metrics at http://[^:]+:(\d+)/metrics", text).group(1))
        pid = server.proc.pid
        image, _ = sample_jpeg(0)
        recorder = Recorder()
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        before = rss_mb(pid)
        samples.append((t0, before))
        stop = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(pid, stop, samples), daemon=True)
        sampler.start()
        kinds = client_kinds(mix, args.clients)
        log(f"{len(kinds)} clients {dict(Counter(kinds))}, warm-up {args.warmup:.0f} s, then "
            f"{args.duration:.0f} s; black-box {args.masks} masks")
        start = t0 + args.warmup
        until = start + args.duration
        run_clients(server.address, image, args, kinds, until, recorder)
        stop.set()
        sampler.join()
        counts = server_counts(metrics_port)
    finally:
        exit_code = server.stop()
    report = {
        "setup": {"clients": dict(Counter(kinds)), "duration_s": args.duration,
                  "warmup_s": args.warmup, "mix": mix, "black_box_masks": args.masks,
                  "models": {"predict": SALIENCY_MODEL, "white_box": SALIENCY_MODEL,
                             "black_box": PLAIN_MODEL}},
        "measured": summarise(recorder, start, until),
        "whole_run_errors": len(recorder.failed),
        "memory": memory_summary(samples, before, start, until),
        "server_requests_total": counts,
        "client_answers_total": len(recorder.done),
        # the server's OK count = the clients' answers + one warm-up ModelInfer per model
        "counts_agree": counts.get("ModelInfer OK", 0) + counts.get("Explain OK", 0)
        == len(recorder.done) + 2,
        "server_exit_code": exit_code,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(args.out.with_suffix(".png"), samples, recorder, t0, start)
    print(json.dumps(report, indent=2))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "bench-out/serving_speed_repo",
                        help="exported into once if empty (shared with serving_speed.py)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load not counted")
    parser.add_argument("--mix", default="predict=6,white_box=3,black_box=1",
                        help="relative weights of the request kinds")
    parser.add_argument("--masks", type=int, default=100, help="RISE masks per black-box call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out/load_test.json")
    return parser.parse_args()


if __name__ == "__main__":
    main()
