"""What the response cache gives a request asked again: one `xaiserve serve
--response-cache-bytes 268435456` of the default model, one Python client over gRPC, p50
latency of answers computed (each request new: a new seed for RISE, other thresholds for a
white-box Explain, which change nothing of the work, another image for ModelInfer) against the
same request asked again (answered from the cache). Per round every kind in turn, the order
flipped each round; each figure is the median over rounds of computed / cached p50.

    .venv/bin/python benchmarks/response_cache.py --json benchmarks/results/response_cache_NAME.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_speed import (SALIENCY_MODEL, channel, ensure_models, log,  # noqa: E402
                           percentile, running_server, sample_jpeg, write_results)

from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb  # noqa: E402
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2 as xpb  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc  # noqa: E402

CACHE_BYTES = 256 * 1024 * 1024


def p50_ms(call: Callable[[int], object], count: int) -> float:
    """Median latency of `count` calls, call i given i."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - started)
    return percentile(latencies, 50) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("bench-out/streaming-models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = Path("bench-out")  # the server's log (the JSON goes where --json says)
    out.mkdir(parents=True, exist_ok=True)
    ensure_models(args.repository, reexport=False)
    jpeg, _ = sample_jpeg(224)
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 224, 224, 3), dtype=np.uint8)
    serial = iter(range(1, 1 << 30))  # every computed request is new, across rounds too

    def explain(method: int, seed: int = 0, threshold: float = 0.5) -> xpb.ExplainRequest:
        return xpb.ExplainRequest(
            model_name=SALIENCY_MODEL, image=xpb.Image(encoded=jpeg), top_k=1, method=method,
            map_format=xpb.MAP_FORMAT_FLOAT, thresholds={"high_confidence": threshold},
            black_box=xpb.BlackBoxOptions(num_masks=args.masks, seed=seed))

    def infer(image: np.ndarray) -> kpb.ModelInferRequest:
        request = kpb.ModelInferRequest(model_name=SALIENCY_MODEL)
        request.inputs.add(name="image", datatype="UINT8", shape=list(image.shape))
        request.outputs.add(name="logits")
        request.raw_input_contents.append(image.tobytes())
        return request

    rounds = []
    with running_server(args.repository, "RESPONSE_CACHE",
                        ["--response-cache-bytes", str(CACHE_BYTES)], out) as server, \
            channel(server.address) as ch:
        explainer = xgrpc.ExplanationServiceStub(ch).Explain
        inferer = kgrpc.GRPCInferenceServiceStub(ch).ModelInfer
        black, white, tensor = (explain(xpb.METHOD_BLACK_BOX, seed=1),
                                explain(xpb.METHOD_WHITE_BOX), infer(images[0]))
        for request, call in ((black, explainer), (white, explainer), (tensor, inferer)):
            call(request, timeout=600)  # kept: every later one is a hit
        kinds = {
            "RISE Explain": (
                lambda i: explainer(explain(xpb.METHOD_BLACK_BOX, seed=1 + next(serial)),
                                    timeout=600),
                lambda i: explainer(black, timeout=600), 3, 30),
            "white-box Explain": (
                lambda i: explainer(explain(xpb.METHOD_WHITE_BOX,
                                            threshold=0.5 + next(serial) * 1e-9), timeout=60),
                lambda i: explainer(white, timeout=60), 60, 60),
            "ModelInfer": (
                lambda i: inferer(infer(images[(next(serial)) % len(images)]), timeout=60),
                lambda i: inferer(tensor, timeout=60), 100, 100),
        }
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            figures = {}
            for name in list(kinds)[::-1 if r % 2 else 1]:
                computed, cached, computed_count, cached_count = kinds[name]
                figures[name] = {"computed_p50_ms": p50_ms(computed, computed_count),
                                 "cached_p50_ms": p50_ms(cached, cached_count)}
                log(f"  {name:<18} computed p50 {figures[name]['computed_p50_ms']:8.2f} ms, "
                    f"cached {figures[name]['cached_p50_ms']:6.2f} ms")
            rounds.append({"figures": figures})
    summary = {name: {
        "computed_over_cached": statistics.median(
            x["figures"][name]["computed_p50_ms"] / x["figures"][name]["cached_p50_ms"]
            for x in rounds),
        "computed_p50_ms": statistics.median(x["figures"][name]["computed_p50_ms"]
                                             for x in rounds),
        "cached_p50_ms": statistics.median(x["figures"][name]["cached_p50_ms"] for x in rounds)}
        for name in kinds}
    print(f"\n{'median of rounds':<20} {'computed p50 ms':>16} {'cached p50 ms':>14} "
          f"{'computed / cached':>18}")
    for name, figure in summary.items():
        print(f"{name:<20} {figure['computed_p50_ms']:>16.2f} {figure['cached_p50_ms']:>14.2f} "
              f"{figure['computed_over_cached']:>18.1f}")
    if args.json:
        write_results(args.json, summary, rounds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
