"""What a stream gives a client against unary calls: ModelStreamInfer and ExplainStream beside
ModelInfer and Explain, on one `xaiserve serve` of the default model, in the same rounds as
OpenVINO's benchmark_app (throughput hint: the runtime's own limit on this machine).

Per round, one after the other (the order flips each round, so that drift hits both sides):
- predict, 1 client: ModelInfer back to back; one ModelStreamInfer with 1 request in flight
  (what a frame costs on a stream); one with `--depth` in flight (a device that sends its next
  frames before the answers come); and, for comparison, `--depth` ModelInfer calls in flight
  on one connection (threads: what a client gets without a stream);
- predict, `--clients` clients: each with ModelInfer back to back, or each with a stream of
  1 in flight;
- Explain, 1 client (JPEG in, top-1 float map out): Explain back to back, `--depth` Explain
  calls in flight on one connection, and one ExplainStream with `--depth` in flight;
and benchmark_app `-hint throughput`. Each figure is its FPS over benchmark_app's of its round,
the median over rounds, with p50 latencies.

    .venv/bin/python benchmarks/streaming.py --json benchmarks/results/streaming_NAME.json
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_speed import (SALIENCY_MODEL, channel, ensure_models, infer_request,  # noqa: E402
                           log, percentile, run_benchmark_app, running_server, sample_jpeg,
                           write_results)

from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2 as xpb  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc  # noqa: E402


@dataclass
class Load:
    """Clients for a fixed window: answers per second and the latency they saw."""

    what: str
    clients: int
    in_flight: int  # per client
    fps: float
    p50_ms: float
    p90_ms: float
    errors: int


def run_window(what: str, clients: int, in_flight: int, client: Callable, warmup_s: float,
               seconds: float) -> Load:
    """`client(stop, done, errors)` per thread; answers counted after the warm-up, before the
    stop (neither ramp in the window)."""
    stop = threading.Event()
    done: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    errors = [0] * clients
    threads = [threading.Thread(target=client, args=(stop, done[i], errors, i), daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    t0 = time.perf_counter()
    time.sleep(seconds)
    t1 = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    latencies = [lat * 1e3 for per in done for (end, lat) in per if t0 <= end < t1]
    return Load(what, clients, in_flight, len(latencies) / (t1 - t0),
                percentile(latencies, 50), percentile(latencies, 90), sum(errors))


def unary_client(address: str, call: Callable, shared=None) -> Callable:
    """Calls back to back, on a connection of the client's own, or on `shared` (a channel the
    window's threads share: one device with several calls in flight)."""
    def calls(ch, stop, done, errors, i) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                call(ch)
            except Exception:  # noqa: BLE001 - counted
                errors[i] += 1
                continue
            now = time.perf_counter()
            done.append((now, now - t))

    def client(stop, done, errors, i) -> None:
        if shared is not None:
            return calls(shared, stop, done, errors, i)
        with channel(address) as ch:
            calls(ch, stop, done, errors, i)
    return client


def stream_client(address: str, open_stream: Callable, request, depth: int,
                  failed: Callable) -> Callable:
    """One stream per client, `depth` requests in flight: the next is sent as an answer
    comes."""
    def client(stop, done, errors, i) -> None:
        room = threading.Semaphore(depth)
        sent: collections.deque[float] = collections.deque()

        def requests():
            while not stop.is_set():
                if room.acquire(timeout=0.1):
                    sent.append(time.perf_counter())
                    yield request

        with channel(address) as ch:
            for answer in open_stream(ch)(requests(), timeout=600):
                now = time.perf_counter()
                done.append((now, now - sent.popleft()))
                errors[i] += bool(failed(answer))
                room.release()
    return client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("bench-out/streaming-models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = Path("bench-out")  # the server's log (the JSON goes where --json says)
    out.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.repository, reexport=False)
    predict = infer_request(SALIENCY_MODEL)
    jpeg, _ = sample_jpeg(224)
    explain = xpb.ExplainRequest(model_name=SALIENCY_MODEL, image=xpb.Image(encoded=jpeg),
                                 top_k=1, map_format=xpb.MAP_FORMAT_FLOAT)
    rounds = []
    with running_server(args.repository, "THROUGHPUT", [], out) as server:
        address = server.address
        shared = channel(address)

        def infer_stream(ch):
            return kgrpc.GRPCInferenceServiceStub(ch).ModelStreamInfer

        def explain_stream(ch):
            return xgrpc.ExplanationServiceStub(ch).ExplainStream

        windows = {
            "predict, unary": (1, 1, unary_client(
                address, lambda ch: kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    predict, timeout=30))),
            "predict, stream": (1, 1, stream_client(
                address, infer_stream, predict, 1, lambda a: a.error_message)),
            f"predict, stream, {args.depth} in flight": (1, args.depth, stream_client(
                address, infer_stream, predict, args.depth, lambda a: a.error_message)),
            f"predict, {args.depth} unary in flight": (args.depth, 1, unary_client(
                address, lambda ch: kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    predict, timeout=30), shared)),
            f"predict, {args.clients} clients unary": (args.clients, 1, unary_client(
                address, lambda ch: kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    predict, timeout=30))),
            f"predict, {args.clients} clients streams": (args.clients, 1, stream_client(
                address, infer_stream, predict, 1, lambda a: a.error_message)),
            "explain, unary": (1, 1, unary_client(
                address, lambda ch: xgrpc.ExplanationServiceStub(ch).Explain(
                    explain, timeout=30))),
            f"explain, {args.depth} unary in flight": (args.depth, 1, unary_client(
                address, lambda ch: xgrpc.ExplanationServiceStub(ch).Explain(
                    explain, timeout=30), shared)),
            f"explain, stream, {args.depth} in flight": (1, args.depth, stream_client(
                address, explain_stream, explain, args.depth, lambda a: a.error_code)),
        }
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            reference = run_benchmark_app(models[SALIENCY_MODEL], "throughput", 1,
                                          int(args.seconds))
            names = list(windows)[::-1 if r % 2 else 1]
            loads = {}
            for name in names:
                clients, depth, client = windows[name]
                load = run_window(name, clients, depth, client, args.warmup, args.seconds)
                loads[name] = load
                log(f"  {name:<36} {load.fps:7.1f}/s ({load.fps / reference.fps:.3f} of "
                    f"benchmark_app), p50 {load.p50_ms:6.2f} ms, errors {load.errors}")
            rounds.append({"benchmark_app_fps": reference.fps,
                           "loads": {n: asdict(load) for n, load in loads.items()}})
        shared.close()
    summary = {}
    for name in windows:
        ratios = [r["loads"][name]["fps"] / r["benchmark_app_fps"] for r in rounds]
        summary[name] = {
            "fps_over_benchmark_app": statistics.median(ratios),
            "rounds": [round(x, 3) for x in ratios],
            "p50_ms": statistics.median(r["loads"][name]["p50_ms"] for r in rounds),
            "errors": sum(r["loads"][name]["errors"] for r in rounds)}
    print(f"\n{'figure (median of rounds)':<38} {'FPS / benchmark_app':>20} {'p50 ms':>8}")
    for name, figure in summary.items():
        print(f"{name:<38} {figure['fps_over_benchmark_app']:>20.3f} {figure['p50_ms']:>8.2f}"
              f"  rounds {figure['rounds']}")
    if args.json:
        write_results(args.json, summary, rounds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
