"""What Triton's system shared memory extension gives a client on the same host: perf_analyzer
(Triton's own tool, scripts/perf_analyzer.sh) against one `xaiserve serve --shared-memory
system --rest-port 0` of the default model, with its tensors in the request and response
(`--shared-memory none`) or in shared memory regions (`system`), over gRPC and REST, at 1 and
4 requests in flight. perf_analyzer asks for every output, so each answer carries the
saliency map (196 KB of floats per image) as well as the scores. Then Explain (our own call,
top-1 float map) of a camera frame at its own size (u8 640 x 480, 1280 x 720, 1920 x 1080;
the server resizes it) from one Python client back to back, the frame in the request
(`image.tensor`) or in a region (`image.shared_memory`).

Per round: benchmark_app `-hint throughput` (the runtime's own limit on this machine), then
every configuration, in an order that flips each round so that the machine's drift hits both
sides. Each figure is its calls per second over benchmark_app's FPS of its round, and over
the same calls with the tensors in the request ("/ sent": `system` over `none`, shared memory
over `image.tensor`); the medians over rounds, with p50 latencies.

    .venv/bin/python benchmarks/shared_memory.py --json benchmarks/results/shared_memory_NAME.json
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_speed import (SALIENCY_MODEL, channel, ensure_models, log,  # noqa: E402
                           percentile, run_benchmark_app, running_server, write_results)

from xaiserve.service.proto import xaiserve_pb2 as xpb  # noqa: E402
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc  # noqa: E402
from xaiserve.service.shared_frames import SharedFrames  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "system")
CAMERA_SIZES = ((480, 640), (720, 1280), (1080, 1920))  # height, width


def rest_port(log_path: Path, timeout: float = 30.0) -> int:
    """The REST port from the server's `REST (...) on port N` line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"REST \(.*\) on port (\d+)", log_path.read_text())
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise TimeoutError(f"no REST port in {log_path}")


def perf_analyzer(url: str, protocol: str, mode: str, concurrency: int, window_ms: int) -> dict:
    """One perf_analyzer run at one concurrency: its CSV row (inferences per second, p50 in
    microseconds, the client's send and receive time)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "perf.csv"
        run = subprocess.run(
            ["bash", str(ROOT / "scripts/perf_analyzer.sh"), "-m", SALIENCY_MODEL, "-i",
             protocol, "-u", url, "--shared-memory", mode, "--concurrency-range",
             str(concurrency), "--measurement-interval", str(window_ms),
             "--stability-percentage", "25", "--max-trials", "8", "-f", str(report)],
            capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed: {(run.stdout + run.stderr)[-2000:]}")
        (row,) = list(csv.DictReader(report.open()))
    return {"fps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3,
            "client_send_ms": float(row["Client Send"]) / 1e3,
            "client_recv_ms": float(row["Client Recv"]) / 1e3}


def explain_requests(frames: SharedFrames) -> dict:
    """Explain of one camera frame sent in the request, and read from `frames`' region."""
    height, width, _ = frames.shape
    frame = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)

    def request(image: xpb.Image) -> xpb.ExplainRequest:
        return xpb.ExplainRequest(model_name=SALIENCY_MODEL, image=image, top_k=1,
                                  map_format=xpb.MAP_FORMAT_FLOAT)
    return {"tensor": request(xpb.Image(tensor=xpb.Tensor(shape=frame.shape,
                                                          data=frame.tobytes()))),
            "shared_memory": request(frames.put(frame))}


def back_to_back(call, request, seconds: float) -> dict:
    """One client's calls for `seconds`: calls per second and p50 latency."""
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        sent = time.perf_counter()
        call(request, timeout=60)
        latencies.append(time.perf_counter() - sent)
    return {"fps": len(latencies) / (time.perf_counter() - start),
            "p50_ms": percentile(latencies, 50) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("bench-out/streaming-models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = Path("bench-out")  # the server's log (the JSON goes where --json says)
    out.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args.repository, reexport=False)
    levels = [int(c) for c in args.concurrency.split(",")]
    configurations = [(protocol, concurrency, mode) for protocol in ("grpc", "http")
                      for concurrency in levels for mode in MODES]
    rounds = []
    explains = [(f"explain {w} x {h}, {mode}", h, w, mode) for h, w in CAMERA_SIZES
                for mode in ("tensor", "shared_memory")]
    objects: list[SharedFrames] = []
    with running_server(args.repository, "SHARED_MEMORY",
                        ["--shared-memory", "system", "--rest-port", "0"], out) as server, \
            channel(server.address) as ch:
        urls = {"grpc": server.address, "http": f"127.0.0.1:{rest_port(server.log_path)}"}
        requests = {}
        for height, width in CAMERA_SIZES:
            objects.append(SharedFrames(ch, (height, width, 3), slots=1))
            requests.update({(height, width, mode): r
                             for mode, r in explain_requests(objects[-1]).items()})
        explainer = xgrpc.ExplanationServiceStub(ch).Explain
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            reference = run_benchmark_app(models[SALIENCY_MODEL], "throughput", 1,
                                          max(1, args.window_ms * 3 // 1000))
            figures = {}
            for protocol, concurrency, mode in configurations[::-1 if r % 2 else 1]:
                name = f"{protocol}, {concurrency} in flight, {mode}"
                figure = perf_analyzer(urls[protocol], protocol, mode, concurrency,
                                       args.window_ms)
                figures[name] = figure
                log(f"  {name:<28} {figure['fps']:7.1f}/s ({figure['fps'] / reference.fps:.3f}"
                    f" of benchmark_app), p50 {figure['p50_ms']:6.2f} ms, client send "
                    f"{figure['client_send_ms']:.2f} + receive {figure['client_recv_ms']:.2f} ms")
            for frames in objects:  # perf_analyzer unregistered every region
                frames.register()
            for name, height, width, mode in explains[::-1 if r % 2 else 1]:
                back_to_back(explainer, requests[(height, width, mode)], 0.5)  # warm-up
                figure = back_to_back(explainer, requests[(height, width, mode)],
                                      args.window_ms / 1000)
                figures[name] = figure
                log(f"  {name:<36} {figure['fps']:7.1f}/s "
                    f"({figure['fps'] / reference.fps:.3f} of benchmark_app), p50 "
                    f"{figure['p50_ms']:6.2f} ms")
            rounds.append({"benchmark_app_fps": reference.fps, "figures": figures})
        for frames in objects:
            frames.close()
    summary = {}
    pairs = [(f"{protocol}, {concurrency} in flight, {mode}",
              f"{protocol}, {concurrency} in flight, none")
             for protocol, concurrency, mode in configurations]
    pairs += [(name, f"explain {w} x {h}, tensor") for name, h, w, _ in explains]
    for name, plain in pairs:
        summary[name] = {
            "fps_over_benchmark_app": statistics.median(
                x["figures"][name]["fps"] / x["benchmark_app_fps"] for x in rounds),
            "fps_over_in_request": statistics.median(
                x["figures"][name]["fps"] / x["figures"][plain]["fps"] for x in rounds),
            "p50_ms": statistics.median(x["figures"][name]["p50_ms"] for x in rounds)}
    print(f"\n{'figure (median of rounds)':<36} {'FPS / benchmark_app':>20} {'/ sent':>7} "
          f"{'p50 ms':>7}")
    for name, figure in summary.items():
        print(f"{name:<36} {figure['fps_over_benchmark_app']:>20.3f} "
              f"{figure['fps_over_in_request']:>7.3f} {figure['p50_ms']:>7.2f}")
    if args.json:
        write_results(args.json, summary, rounds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
