"""What the REST side costs against the gRPC side, on one `xaiserve serve` process that has
both (`--rest-port`), default model (EfficientNet-Lite0 with ReciproCAM):

1. one client, sequential calls, p50 latency: ModelInfer u8 [1, 224, 224, 3] (class scores
   only) over gRPC (raw_input_contents), over REST with Triton's binary tensor data, and over
   REST as plain JSON (150 528 numbers each way in text); white-box Explain of a JPEG, float
   map, over gRPC and over REST (the ExplainRequest as proto3 JSON);
2. 8 concurrent clients, each on its own connection, ModelInfer u8 -> requests per second,
   gRPC against REST with binary tensors.

Python clients on both sides (grpcio's stub; `service/rest_client.py`, the standard library's
http.client with keep-alive, as `xaiserve bench --server http://...` uses it), on the same
machine as the server: the client's own cost is in every figure, as it is for a user's.
Rounds alternate the protocols (the machine's speed drifts); each ratio is the median of the
per-round ratios, REST over gRPC (latency: > 1 is slower; throughput: < 1 is slower).

    .venv/bin/python benchmarks/rest_vs_grpc.py            # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_speed import (SALIENCY_MODEL, ServerProcess, channel, ensure_models,  # noqa: E402
                           infer_request, log, sample_jpeg)

from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2 as xpb  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc  # noqa: E402
from xaiserve.service.rest_client import RestClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIXELS = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)


def rest_infer_binary(client: RestClient) -> Callable[[], dict]:
    request = infer_request(SALIENCY_MODEL)
    return lambda: client.infer(request)


def rest_infer_json(client: RestClient) -> Callable[[], bytes]:
    body = json.dumps({"inputs": [{"name": "image", "shape": list(PIXELS.shape),
                                   "datatype": "UINT8", "data": PIXELS.ravel().tolist()}],
                       "outputs": [{"name": "logits"}]}).encode()
    return lambda: client.call("POST", f"/v2/models/{SALIENCY_MODEL}/infer", body,
                               {"Content-Type": "application/json"})


def explain_request(jpeg: bytes) -> xpb.ExplainRequest:
    return xpb.ExplainRequest(model_name=SALIENCY_MODEL, image=xpb.Image(encoded=jpeg),
                              method=xpb.METHOD_WHITE_BOX, map_format=xpb.MAP_FORMAT_FLOAT)


def rest_explain(client: RestClient, jpeg: bytes) -> Callable[[], dict]:
    request = explain_request(jpeg)
    return lambda: client.explain(request)


def grpc_explain(ch: grpc.Channel, jpeg: bytes) -> Callable[[], object]:
    stub = xgrpc.ExplanationServiceStub(ch)
    request = explain_request(jpeg)
    return lambda: stub.Explain(request, timeout=60)


def grpc_infer(ch: grpc.Channel) -> Callable[[], object]:
    stub = kgrpc.GRPCInferenceServiceStub(ch)
    request = infer_request(SALIENCY_MODEL)
    return lambda: stub.ModelInfer(request, timeout=60)


def p50_ms(call: Callable[[], object], count: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def throughput(make_call: Callable[[], Callable[[], object]], clients: int,
               seconds: float) -> float:
    """Requests per second of `clients` threads, each with its own connection."""
    calls = [make_call() for _ in range(clients)]
    for call in calls:
        call()
    counts = [0] * clients
    stop = threading.Event()

    def run(i: int) -> None:
        while not stop.is_set():
            calls[i]()
            counts[i] += 1
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


class RestServerProcess(ServerProcess):
    """The benchmark's server process, with its REST port read from its log as well."""

    rest_port: int = 0

    def start(self, timeout: float = 120.0) -> "RestServerProcess":
        super().start(timeout)
        found = re.search(r"REST at http://[^:]+:(\d+)/v2", self.log_path.read_text())
        if not found:
            raise RuntimeError(f"the server printed no REST port; see {self.log_path}")
        self.rest_port = int(found.group(1))
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "bench-out/serving_speed_repo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=150, help="sequential calls per figure")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput window")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench-out/rest_vs_grpc.json")
    args = parser.parse_args(argv)
    ensure_models(args.repository, False)
    jpeg, _ = sample_jpeg(0)
    server = RestServerProcess(args.repository, "both sides", ["--rest-port", "0"],
                               args.out.with_suffix(".server.log")).start()
    rounds: list[dict[str, float]] = []
    try:
        ch = channel(server.address)
        rest = RestClient(f"127.0.0.1:{server.rest_port}")
        figures = {
            "predict_grpc_ms": lambda: p50_ms(grpc_infer(ch), args.calls),
            "predict_rest_binary_ms": lambda: p50_ms(rest_infer_binary(rest), args.calls),
            "predict_rest_json_ms": lambda: p50_ms(rest_infer_json(rest), args.calls // 3),
            "explain_grpc_ms": lambda: p50_ms(grpc_explain(ch, jpeg), args.calls // 3),
            "explain_rest_ms": lambda: p50_ms(rest_explain(rest, jpeg), args.calls // 3),
            "predict_grpc_rps": lambda: throughput(lambda: grpc_infer(channel(server.address)),
                                                   args.clients, args.seconds),
            "predict_rest_binary_rps": lambda: throughput(
                lambda: rest_infer_binary(RestClient(f"127.0.0.1:{server.rest_port}")),
                args.clients, args.seconds),
        }
        for number in range(args.rounds):
            names = list(figures) if number % 2 == 0 else list(reversed(figures))
            rounds.append({name: figures[name]() for name in names})
            log(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}"
                                                    for k, v in rounds[-1].items()))
    finally:
        server.stop()

    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(r[numerator] / r[denominator] for r in rounds)

    result = {
        "rounds": rounds,
        "medians": {name: statistics.median(r[name] for r in rounds) for name in rounds[0]},
        "rest_over_grpc": {
            "predict_binary_latency": ratio("predict_rest_binary_ms", "predict_grpc_ms"),
            "predict_json_latency": ratio("predict_rest_json_ms", "predict_grpc_ms"),
            "explain_latency": ratio("explain_rest_ms", "explain_grpc_ms"),
            "predict_binary_throughput": ratio("predict_rest_binary_rps", "predict_grpc_rps")},
        "clients": args.clients, "calls": args.calls, "seconds": args.seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": result["medians"], "rest_over_grpc": result["rest_over_grpc"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
