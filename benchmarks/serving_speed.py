"""Serving speed of `xaiserve serve` against OpenVINO's benchmark_app on the same IRs.

benchmark_app is the ceiling: it runs the compiled model with nothing around it. The server adds
gRPC, protobuf, Python, image decoding, maps and metrics; these figures say how much of the
ceiling a client still sees, one run, default model (EfficientNet-Lite0 with ReciproCAM):

1. predictions: KServe ModelInfer, u8 [1, 224, 224, 3] as raw_input_contents, 8 concurrent
   clients -> FPS / benchmark_app `-hint throughput` FPS (target >= 0.85). Python threads here,
   each its own channel and connection, ask for the class scores only (the server runs its
   copy without the saliency branch). A second figure uses Triton's perf_analyzer (C++,
   `--concurrency-range 8`; scripts/setup_clients.sh installs it): it asks for every output in
   ModelConfig, so its requests compute and return the saliency maps too, the same work as
   benchmark_app on the IR;
2. white-box Explain, JPEG in, top-1 map out (float, and the PNG overlay), 1 client -> p50 /
   benchmark_app `-hint latency` p50 (target <= 1.4), on the default server (THROUGHPUT hint) and
   on one started with `--performance-hint LATENCY`;
3. black-box RISE, 1000 masks, fixed seed, on the plain IR -> wall time per request / (1000 /
   benchmark_app's best FPS among throughput runs at batch 1, 8 and 16) (target <= 1.2).

The server runs as a subprocess (`xaiserve serve` on a free loopback port) and is stopped with
SIGTERM. This machine's speed drifts while a run lasts, so every figure is measured in paired
rounds, each next to its own benchmark_app run (the explain latency between two of them, their
mean its reference), and its ratio is the median of the per-round ratios. Each window also
records the CPU that the server, the clients and everything else on the machine used: on a
small shared machine other processes are the largest source of error.

    .venv/bin/python benchmarks/serving_speed.py              # about 4.5 minutes
    .venv/bin/python benchmarks/serving_speed.py --quick      # about 2.5 minutes, noisier
    .venv/bin/python benchmarks/serving_speed.py --only explain --rounds 15 --no-latency-server
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import grpc
import numpy as np

from xaiserve.service import bench_reference as reference
from xaiserve.service import bench_works as works
from xaiserve.service.client import open_channel
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SALIENCY_MODEL = "efficientnet_lite0"
PLAIN_MODEL = "plain"
INPUT_SHAPE = (1, 224, 224, 3)
TARGET_PREDICT_FPS = 0.85  # ours / benchmark_app, at least
TARGET_EXPLAIN_P50 = 1.4  # ours / benchmark_app, at most
TARGET_RISE_WALL = 1.2  # ours / (masks / best FPS), at most
MAX_MESSAGE = 64 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY_CORES = 0.25  # CPU used by others during a window above which it is flagged
FIGURE_GROUPS = ("predict", "explain", "rise")  # --only's choices, in the order of a round


def log(message: str) -> None:
    """Progress goes to stderr so that stdout is only the summary."""
    print(message, file=sys.stderr, flush=True)


# --- CPU accounting ---------------------------------------------------------------------------
# Two cores are shared by the server, the clients and whoever else runs on the machine: a window
# in which other processes took CPU is not comparable with one in which they did not.

def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot (/proc/stat)."""
    fields_ = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)  # idle + iowait
    return (sum(fields_[:8]) - idle) / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, all its threads (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat.rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / CLK_TCK


def own_cpu_seconds() -> float:
    """This process (the clients) in CPU-seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """Reaped children (benchmark_app runs) in CPU-seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """Cores used on average during a window, split into ours and everything else."""

    wall_s: float
    machine_cores: float
    server_cores: float
    client_cores: float
    other_cores: float


class CpuMeter:
    """Samples machine, server and client CPU at the start and the stop of a window.

    `server` gives the CPU-seconds of what is being measured: a server process, or the reaped
    children for benchmark_app (it has exited, so /proc no longer has it)."""

    def __init__(self, server: Callable[[], float]):
        self.server = server

    @classmethod
    def of_process(cls, pid: int) -> "CpuMeter":
        return cls(lambda: process_cpu_seconds(pid))

    def _sample(self) -> tuple[float, float, float, float]:
        return time.perf_counter(), machine_busy_seconds(), self.server(), own_cpu_seconds()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> CpuWindow:
        t0, m0, s0, c0 = self._start
        t1, m1, s1, c1 = self._sample()
        wall = t1 - t0
        machine, server, client = (m1 - m0) / wall, (s1 - s0) / wall, (c1 - c0) / wall
        return CpuWindow(wall, machine, server, client, max(0.0, machine - server - client))


def load_average() -> float:
    return os.getloadavg()[0]


# --- inputs -----------------------------------------------------------------------------------

def ensure_models(repository: Path, reexport: bool) -> dict[str, Path]:
    """The default model with saliency and a plain IR of it, exported once and kept: an export
    takes ~20 s, which would otherwise be a tenth of every run."""
    wanted = {SALIENCY_MODEL: "auto", PLAIN_MODEL: "none"}
    paths = {}
    for name, method in wanted.items():
        xml = repository / name / "1" / "model.xml"
        if reexport and xml.parent.parent.exists():
            import shutil
            shutil.rmtree(xml.parent.parent)
        if not xml.is_file():
            log(f"exporting {name} (--method {method}) into {repository}")
            subprocess.run([str(VENV_BIN / "xaiserve"), "export", "default", "--repository",
                            str(repository), "--name", name, "--version", "1",
                            "--method", method], check=True, stdout=subprocess.DEVNULL)
        paths[name] = xml
    return paths


def sample_jpeg(size: int) -> tuple[bytes, tuple[int, int]]:
    """The library's sample photo as JPEG; `size` > 0: size x size, 0: the photo's 451 x 300."""
    data, _ = works.sample_jpeg(size)
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return data, (rgb.shape[0], rgb.shape[1])


# --- benchmark_app ----------------------------------------------------------------------------

@dataclass
class BenchApp(reference.ReferenceRun):
    """One benchmark_app run (the library's record) and what the machine did meanwhile."""

    model: str = ""
    cpu: CpuWindow | None = None


def run_benchmark_app(xml: Path, hint: str, batch: int, seconds: int) -> BenchApp:
    """benchmark_app on CPU with a static [batch, 224, 224, 3] input (the library's run), and
    the CPU the machine used meanwhile."""
    meter = CpuMeter(children_cpu_seconds)
    meter.start()
    ref = reference.run_benchmark_app(xml, hint=hint, batch=batch, seconds=seconds,
                                      input_hw=INPUT_SHAPE[1:3])
    cpu = meter.stop()
    result = BenchApp(**vars(ref), model=xml.parent.parent.name, cpu=cpu)
    log(f"  benchmark_app {result.model:<18} {hint:<10} b{batch:<2}: {ref.fps:7.1f} FPS, "
        f"p50 {ref.p50_ms:6.2f} ms, nireq {result.infer_requests}, streams {result.streams}, "
        f"others {cpu.other_cores:.2f} cores")
    return result


# --- the server -------------------------------------------------------------------------------

def channel(address: str) -> grpc.Channel:
    """A channel with its own TCP connection (8 'clients' must not be 8 streams on one socket)."""
    return open_channel(address, MAX_MESSAGE, own_connection=True, retries=0)


@dataclass
class ServerProcess:
    """`xaiserve serve` as a subprocess on a free loopback port."""

    repository: Path
    label: str
    extra_args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    startup_s: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        """Start on port 0 (the kernel picks a free one; picking one here and passing it on
        would race with every other process binding ports) and read the port from its log."""
        cmd = [str(VENV_BIN / "xaiserve"), "serve", "--repository", str(self.repository),
               "--host", "127.0.0.1", "--port", "0", *self.extra_args]
        log(f"starting server [{self.label}]: {' '.join(cmd[1:])}")
        t = time.perf_counter()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        self.port = self._wait_port(deadline)
        self._wait_ready(deadline)
        self.startup_s = time.perf_counter() - t
        self._warm_up()
        log(f"  ready in {self.startup_s:.1f} s (pid {self.proc.pid}, port {self.port})")
        return self

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")

    def _wait_port(self, deadline: float) -> int:
        """The port from the server's `serving ... on port N` line."""
        while time.monotonic() < deadline:
            self._check_alive()
            m = re.search(r"serving .* on port (\d+)", self.log_path.read_text())
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        raise TimeoutError(f"server printed no port; see {self.log_path}")

    def _warm_up(self) -> None:
        """One prediction per model, one at a time, before any concurrent load. Concurrent
        *first* inferences in a fresh server can deadlock it for good (OpenVINO's Python
        binding initialises a pybind11 static on the first ndarray copy; two threads racing
        there wait on each other while one holds the GIL), and a benchmark is about the steady
        state anyway."""
        with channel(self.address) as ch:
            stub = kgrpc.GRPCInferenceServiceStub(ch)
            for model in (SALIENCY_MODEL, PLAIN_MODEL):
                stub.ModelInfer(infer_request(model), timeout=60)

    def _wait_ready(self, deadline: float) -> None:
        """ServerReady true and both models ready."""
        with channel(self.address) as ch:
            stub = kgrpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if stub.ServerReady(kpb.ServerReadyRequest(), timeout=2).ready and all(
                            stub.ModelReady(kpb.ModelReadyRequest(name=m), timeout=2).ready
                            for m in (SALIENCY_MODEL, PLAIN_MODEL)):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not ready in time; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGTERM, as an orchestrator would; kill only if it does not leave in time."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        log(f"  server [{self.label}] stopped, exit {code}")
        return code


@contextmanager
def running_server(repository: Path, label: str, extra_args: list[str],
                   out_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(repository, label, extra_args,
                           out_dir / f"serving_speed_server_{label.lower()}.log")
    try:
        yield server.start()
    finally:
        server.stop()


# --- measurements -----------------------------------------------------------------------------

def write_results(path: Path, summary: dict, rounds: list, args: argparse.Namespace) -> None:
    """A benchmark's JSON: its summary, every round's figures, and the options it ran with."""
    path.write_text(json.dumps({"summary": summary, "rounds": rounds,
                                "args": {k: str(v) for k, v in vars(args).items()}},
                               indent=2) + "\n")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class LoadResult:
    """Concurrent clients for a fixed window: throughput and the latency each client saw."""

    clients: int
    fps: float
    requests: int
    window_s: float
    p50_ms: float
    p90_ms: float
    errors: int
    server_cpu_ms_per_request: float
    client_cpu_ms_per_request: float
    cpu: CpuWindow
    first_error: str = ""


def infer_request(model: str) -> kpb.ModelInferRequest:
    """A KServe v2 request for one random u8 image, as raw_input_contents."""
    image = np.random.default_rng(0).integers(0, 256, INPUT_SHAPE, dtype=np.uint8)
    request = kpb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="UINT8", shape=list(INPUT_SHAPE))
    request.raw_input_contents.append(image.tobytes())
    return request


def measure_predict(server: ServerProcess, model: str, clients: int, warmup_s: float,
                    seconds: float) -> LoadResult:
    """`clients` threads, each with its own channel, call ModelInfer back to back. Counting
    starts after the warm-up and stops before the clients do, so that neither ramp is in the
    window (the clients release the GIL while they wait on the server)."""
    request = infer_request(model)
    stop = threading.Event()
    done: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    errors = [0] * clients
    first_error: list[str] = []

    def client(i: int) -> None:
        with channel(server.address) as ch:
            stub = kgrpc.GRPCInferenceServiceStub(ch)
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    errors[i] += 1
                    first_error.append(f"{exc.code().name} after "
                                       f"{time.perf_counter() - t:.1f} s: {exc.details()}")
                    continue
                now = time.perf_counter()
                done[i].append((now, now - t))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    time.sleep(warmup_s)
    meter = CpuMeter.of_process(server.proc.pid)
    meter.start()
    t0 = time.perf_counter()
    time.sleep(seconds)
    t1 = time.perf_counter()
    cpu = meter.stop()
    stop.set()
    for th in threads:
        th.join(timeout=60)
    latencies = [lat * 1e3 for per in done for (end, lat) in per if t0 <= end < t1]
    n = len(latencies)
    return LoadResult(clients, n / (t1 - t0), n, t1 - t0, percentile(latencies, 50),
                      percentile(latencies, 90), sum(errors),
                      cpu.server_cores * cpu.wall_s * 1e3 / max(n, 1),
                      cpu.client_cores * cpu.wall_s * 1e3 / max(n, 1), cpu,
                      first_error[0] if first_error else "")


PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer.sh"


def perf_analyzer_ready() -> bool:
    return (ROOT / ".venv-perf" / "bin" / "perf_analyzer").exists()


def measure_predict_perf_analyzer(server: ServerProcess, model: str, clients: int,
                                  seconds: float, out_dir: Path) -> LoadResult:
    """Triton's perf_analyzer at concurrency `clients` (synchronous requests, each client its
    own connection, random u8 images, every output: scores and maps): its last three windows
    of `seconds` / 3 each, averaged; the CPU columns cover its whole run, warm-up included."""
    report = out_dir / "serving_speed_perf_analyzer.csv"
    window_ms = max(1000, int(seconds * 1000 / 3))
    meter = CpuMeter.of_process(server.proc.pid)
    client_before = children_cpu_seconds()
    meter.start()
    run = subprocess.run(
        ["bash", str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", server.address,
         "--concurrency-range", str(clients), "-p", str(window_ms), "--max-trials", "3",
         "--stability-percentage", "100", "-f", str(report)],
        capture_output=True, text=True, timeout=300,
        # each client its own connection, as the Python clients (perf_analyzer's default
        # shares one connection among up to 6 clients)
        env={**os.environ, "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "1"})
    cpu = meter.stop()
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {run.returncode}: {run.stderr[-500:]}")
    row = next(csv.DictReader(report.open()))
    fps = float(row["Inferences/Second"])
    count = fps * cpu.wall_s  # requests over the whole run, for the per-request CPU
    client_cores = (children_cpu_seconds() - client_before) / cpu.wall_s
    cpu.client_cores, cpu.other_cores = client_cores, max(
        0.0, cpu.machine_cores - cpu.server_cores - client_cores)
    return LoadResult(clients, fps, int(round(fps * 3 * window_ms / 1e3)), 3 * window_ms / 1e3,
                      float(row["p50 latency"]) / 1e3, float(row["p90 latency"]) / 1e3, 0,
                      cpu.server_cores * cpu.wall_s * 1e3 / max(count, 1),
                      client_cores * cpu.wall_s * 1e3 / max(count, 1), cpu)


@dataclass
class LatencyResult:
    """One client, sequential calls: client-side latency and the server's own stage timings."""

    what: str
    count: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    server_p50_ms: dict[str, float]
    response_bytes: int
    server_cpu_ms_per_request: float
    cpu: CpuWindow
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    stages_ms: dict[str, list[float]] = field(default_factory=dict, repr=False)


STAGES = ("decode", "preprocess", "inference", "explanation", "encode_maps", "metrics", "total")


def stage_order(name: str) -> int:
    """The server's stages in the order they run (timings_ms is an unordered map)."""
    return STAGES.index(name) if name in STAGES else len(STAGES)


def latency_result(what: str, latencies: list[float], stages: dict[str, list[float]],
                   size: int, server_cpu_ms: float, cpu: CpuWindow) -> LatencyResult:
    return LatencyResult(
        what, len(latencies), percentile(latencies, 50), percentile(latencies, 90),
        statistics.fmean(latencies), min(latencies),
        {k: percentile(stages[k], 50) for k in sorted(stages, key=stage_order)}, size,
        server_cpu_ms, cpu, latencies, stages)


def measure_sequential(server: ServerProcess, what: str, call: Callable[[], object],
                       warmup: int, seconds: float, min_count: int = 1,
                       pause_s: float = 0.0) -> LatencyResult:
    """Call back to back (or `pause_s` apart, the pause not timed) for `seconds` (at least
    `min_count` calls) after `warmup` calls; the server's timings_ms come along when the
    response has them."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    size = 0
    meter = CpuMeter.of_process(server.proc.pid)
    meter.start()
    end = time.perf_counter() + seconds
    while len(latencies) < min_count or time.perf_counter() < end:
        if pause_s:
            time.sleep(pause_s)
        t = time.perf_counter()
        response = call()
        latencies.append((time.perf_counter() - t) * 1e3)
        for name, value in getattr(response, "timings_ms", {}).items():
            stages.setdefault(name, []).append(value)
        size = response.ByteSize()
    cpu = meter.stop()
    result = latency_result(what, latencies, stages, size,
                            cpu.server_cores * cpu.wall_s * 1e3 / len(latencies), cpu)
    log(f"    {what:<30} p50 {result.p50_ms:8.2f} ms  (n={result.count}; server "
        + " ".join(f"{k} {v:.2f}" for k, v in result.server_p50_ms.items())
        + f"; others {cpu.other_cores:.2f} cores)")
    return result


def merge_latencies(results: list[LatencyResult]) -> LatencyResult:
    """All rounds' calls as one sample, for the stage breakdown."""
    latencies = [v for r in results for v in r.latencies_ms]
    stages: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.stages_ms.items():
            stages.setdefault(k, []).extend(v)
    cpu_ms = statistics.fmean(r.server_cpu_ms_per_request for r in results)
    worst = max((r.cpu for r in results), key=lambda c: c.other_cores)
    return latency_result(results[0].what, latencies, stages, results[-1].response_bytes,
                          cpu_ms, worst)


def explain_call(ch: grpc.Channel, image: bytes, map_format: int, method: int,
                 model: str, masks: int = 0, seed: int = 0) -> Callable[[], xpb.ExplainResponse]:
    """An Explain call bound to one channel, top-1 map."""
    stub = xgrpc.ExplanationServiceStub(ch)
    request = xpb.ExplainRequest(model_name=model, image=xpb.Image(encoded=image), top_k=1,
                                 method=method, map_format=map_format,
                                 black_box=xpb.BlackBoxOptions(num_masks=masks, seed=seed))
    return lambda: stub.Explain(request, timeout=300)


def predict_call(ch: grpc.Channel, model: str) -> Callable[[], kpb.ModelInferResponse]:
    stub = kgrpc.GRPCInferenceServiceStub(ch)
    request = infer_request(model)
    return lambda: stub.ModelInfer(request, timeout=30)


def compiled_properties(xml: Path, hint: str) -> dict:
    """What the server's compile of this IR gets with this hint: streams, threads and the
    infer-request pool size (the server sizes its pool by OPTIMAL_NUMBER_OF_INFER_REQUESTS)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": hint})
    props = {name: str(compiled.get_property(name)) for name in (
        "NUM_STREAMS", "INFERENCE_NUM_THREADS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS",
        "INFERENCE_PRECISION_HINT")}
    del compiled
    return props


# --- paired rounds ----------------------------------------------------------------------------
# This VM's speed drifts by +-30 % over minutes (other tenants of the host), so a reference
# measured once at the start is not comparable with a figure measured three minutes later. Each
# figure is measured in rounds, each round next to its own benchmark_app run, the order flipped
# every round; a figure's ratio is the median of its per-round ratios.

@dataclass
class Figure:
    """One compared figure: per-round (ours, reference) and the verdict."""

    name: str
    unit: str
    higher_is_better: bool
    target: float
    ours: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)

    def add(self, ours: float, reference: float) -> None:
        self.ours.append(ours)
        self.reference.append(reference)

    @property
    def round_ratios(self) -> list[float]:
        return [o / r for o, r in zip(self.ours, self.reference)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.round_ratios)

    @property
    def median_round(self) -> int:
        """The round whose ratio is the (lower) median. The table shows that round's pair, so
        its two figures divide into the ratio beside them; medians taken apart would not."""
        ratios = self.round_ratios
        return ratios.index(statistics.median_low(ratios))

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def summary(self) -> dict:
        i = self.median_round
        return {"figure": self.name, "unit": self.unit, "ours": self.ours[i],
                "reference": self.reference[i], "ratio": self.ratio,
                "target": f"{'>=' if self.higher_is_better else '<='} {self.target}",
                "passed": self.passed, "rounds_ours": self.ours,
                "rounds_reference": self.reference, "rounds_ratio": self.round_ratios}


def in_order(flip: bool, *steps: Callable[[], object]) -> list[object]:
    """Run the steps in order, or in reverse when `flip`; results in the given order."""
    order = list(range(len(steps)))[::-1] if flip else list(range(len(steps)))
    results: list[object] = [None] * len(steps)
    for i in order:
        results[i] = steps[i]()
    return results


def best_plain_batch(models: dict[str, Path], args: argparse.Namespace,
                     refs: list[BenchApp]) -> int:
    """benchmark_app's best throughput batch on the plain IR (RISE submits batches, so its
    fair ceiling is the best of them), swept once."""
    sweep = [run_benchmark_app(models[PLAIN_MODEL], "throughput", b, args.ba_seconds)
             for b in args.plain_batches]
    refs.extend(sweep)
    return max(sweep, key=lambda r: r.fps).batch


def run_server_rounds(server: ServerProcess, models: dict[str, Path], image: bytes,
                      args: argparse.Namespace, rise: bool) -> dict:
    """Every figure against one running server, in paired rounds with benchmark_app."""
    label = server.label
    sal, plain = models[SALIENCY_MODEL], models[PLAIN_MODEL]
    figures: dict[str, Figure] = {}
    if "predict" in args.only:
        figures["predict"] = Figure(f"[{label}] predict FPS, {args.clients} clients", "FPS",
                                    True, TARGET_PREDICT_FPS)
        if args.perf_analyzer:
            figures["predict_pa"] = Figure(
                f"[{label}] predict+maps FPS, perf_analyzer c{args.clients}", "FPS", True,
                TARGET_PREDICT_FPS)
    if "explain" in args.only:
        figures["explain_float"] = Figure(f"[{label}] explain p50, float", "ms", False,
                                          TARGET_EXPLAIN_P50)
        figures["explain_overlay"] = Figure(f"[{label}] explain p50, PNG overlay", "ms", False,
                                            TARGET_EXPLAIN_P50)
    if rise:
        figures["rise"] = Figure(f"[{label}] RISE {args.masks} masks, wall", "ms", False,
                                 TARGET_RISE_WALL)
    refs: list[BenchApp] = []
    results: dict[str, list] = {k: [] for k in ("predict", "predict_pa", "live", "live_idle",
                                                "predict_1",
                                                "explain_float", "explain_overlay", "rise")}

    def ba(xml: Path, hint: str, batch: int = 1) -> BenchApp:
        refs.append(run_benchmark_app(xml, hint, batch, args.ba_seconds))
        return refs[-1]

    with channel(server.address) as ch:
        float_call = explain_call(ch, image, xpb.MAP_FORMAT_FLOAT, xpb.METHOD_WHITE_BOX,
                                  SALIENCY_MODEL)
        overlay_call = explain_call(ch, image, xpb.MAP_FORMAT_PNG_OVERLAY, xpb.METHOD_WHITE_BOX,
                                    SALIENCY_MODEL)
        rise_call = explain_call(ch, image, xpb.MAP_FORMAT_FLOAT, xpb.METHOD_BLACK_BOX,
                                 PLAIN_MODEL, masks=args.masks, seed=args.seed)
        live = kgrpc.GRPCInferenceServiceStub(ch)

        def live_call() -> kpb.ServerLiveResponse:
            return live.ServerLive(kpb.ServerLiveRequest(), timeout=10)

        def predict_round(flip: bool) -> None:
            ref, load = in_order(flip, lambda: ba(sal, "throughput"), lambda: measure_predict(
                server, SALIENCY_MODEL, args.clients, args.predict_warmup, args.predict_seconds))
            log(f"    ModelInfer x{args.clients} clients       {load.fps:8.1f} FPS (p50 "
                f"{load.p50_ms:.1f} ms, server {load.server_cpu_ms_per_request:.1f} CPU-ms/req, "
                f"others {load.cpu.other_cores:.2f} cores)")
            figures["predict"].add(load.fps, ref.fps)
            results["predict"].append(load)
            if args.perf_analyzer:
                pa = measure_predict_perf_analyzer(server, SALIENCY_MODEL, args.clients,
                                                   args.predict_seconds, args.out.parent)
                log(f"    perf_analyzer c{args.clients}            {pa.fps:8.1f} FPS (p50 "
                    f"{pa.p50_ms:.1f} ms, server {pa.server_cpu_ms_per_request:.1f} CPU-ms/req, "
                    f"client {pa.cpu.client_cores:.2f} cores)")
                figures["predict_pa"].add(pa.fps, ref.fps)
                results["predict_pa"].append(pa)

        def explain_round() -> None:
            def ours_latency() -> tuple[LatencyResult, LatencyResult]:
                return (measure_sequential(server, "Explain white-box float", float_call,
                                           args.explain_warmup, args.explain_seconds),
                        measure_sequential(server, "Explain white-box overlay", overlay_call,
                                           args.explain_warmup, args.explain_seconds))
            # benchmark_app before and after ours, their mean the reference: this machine
            # switches between a fast and a slow state (benchmark_app's p50 7 or 10 ms) from
            # one window to the next, and one window on each side halves the error that a
            # switch between a single pair of windows makes.
            before = ba(sal, "latency")
            flt, ovl = ours_latency()
            reference_ms = (before.p50_ms + ba(sal, "latency").p50_ms) / 2
            figures["explain_float"].add(flt.p50_ms, reference_ms)
            figures["explain_overlay"].add(ovl.p50_ms, reference_ms)
            results["explain_float"].append(flt)
            results["explain_overlay"].append(ovl)
            results["live"].append(measure_sequential(
                server, "ServerLive (gRPC floor)", live_call, 20, 1))
            # Client and server idle as long as an Explain's inference, as they are in one:
            # waking idle threads (and, in a VM, idle vCPUs) is part of that round trip.
            results["live_idle"].append(measure_sequential(
                server, "ServerLive after idle", live_call, 5, 1,
                pause_s=reference_ms / 1e3))
            results["predict_1"].append(measure_sequential(
                server, "ModelInfer x1", predict_call(ch, SALIENCY_MODEL), 10, 2))

        def rise_round(flip: bool) -> None:
            ref, wall = in_order(flip, lambda: ba(plain, "throughput", batch),
                                 lambda: measure_sequential(
                                     server, f"Explain RISE {args.masks} masks", rise_call,
                                     0, 0, min_count=args.rise_repeats))
            figures["rise"].add(wall.p50_ms, args.masks / ref.fps * 1e3)
            results["rise"].append(wall)

        batch = best_plain_batch(models, args, refs) if rise else 1
        if rise:
            log("    RISE warm-up (generates and caches the masks)")
            rise_call()
        for r in range(args.rounds):
            flip = r % 2 == 1
            log(f"  [{label}] round {r + 1}/{args.rounds}")
            if "predict" in args.only:
                predict_round(flip)
            if "explain" in args.only:
                explain_round()
            if rise:
                rise_round(flip)
    return {"figures": figures, "benchmark_app": refs, "results": results,
            "startup_s": server.startup_s, "rise_batch": batch if rise else None}


# --- report -----------------------------------------------------------------------------------

def table(servers: dict[str, dict], args: argparse.Namespace) -> str:
    """One screen: the figures, then what they are made of."""
    head = (f"{'figure':<48} {'ours':>9} {'reference':>10} {'ratio':>6} {'target':>7}  ok    "
            "rounds")
    lines = [head, "-" * len(head)]
    for s in servers.values():
        for f in s["figures"].values():
            d = f.summary()
            rounds = " ".join(f"{r:.2f}" for r in f.round_ratios)
            lines.append(f"{f.name:<48} {d['ours']:9.2f} {d['reference']:10.2f} {f.ratio:6.2f} "
                         f"{d['target']:>7}  {'pass' if f.passed else 'FAIL'}  {rounds}")
    lines.append(f"(ratio: the median of {args.rounds} paired rounds' ratios, listed under rounds; "
                 "ours and reference: the pair of the round at the median; reference = "
                 "benchmark_app, same IR: -hint throughput FPS, -hint latency p50 (the mean of "
                 "the runs just before and after), masks / best plain FPS)")
    for label, s in servers.items():
        res = s["results"]
        loads = res["predict"]
        if loads:
            p50 = statistics.median(x.p50_ms for x in loads)
            cores = statistics.median(x.cpu.server_cores for x in loads)
            server_ms = statistics.median(x.server_cpu_ms_per_request for x in loads)
            client_ms = statistics.median(x.client_cpu_ms_per_request for x in loads)
            lines.append(
                f"[{label}] ModelInfer x{args.clients}: p50 {p50:.1f} ms, server {cores:.2f} "
                f"cores = {server_ms:.1f} CPU-ms/req, clients {client_ms:.1f} CPU-ms/req")
        if res["live"]:
            one = merge_latencies(res["predict_1"]).p50_ms
            floor = merge_latencies(res["live"]).p50_ms
            idle_floor = merge_latencies(res["live_idle"]).p50_ms
            lines.append(
                f"[{label}] ModelInfer x1 p50 {one:.2f} ms; ServerLive p50 {floor:.2f} ms back "
                f"to back, {idle_floor:.2f} ms after an idle pause as long as benchmark_app's "
                "latency p50")
        pas = res["predict_pa"]
        if pas:
            lines.append(
                f"[{label}] perf_analyzer c{args.clients}: p50 "
                f"{statistics.median(x.p50_ms for x in pas):.1f} ms, server "
                f"{statistics.median(x.server_cpu_ms_per_request for x in pas):.1f} CPU-ms/req, "
                f"client {statistics.median(x.client_cpu_ms_per_request for x in pas):.1f} "
                "CPU-ms/req")
        errors = [x for x in loads if x.errors]
        if errors:
            lines.append(f"  ERRORS in ModelInfer load: {sum(x.errors for x in errors)}, first: "
                         f"{errors[0].first_error}")
        for name in ("explain_float", "explain_overlay", "rise"):
            if res[name]:
                e = merge_latencies(res[name])
                stages = " ".join(f"{k[:5]} {v:.1f}" for k, v in e.server_p50_ms.items())
                lines.append(f"  {name}: p50 {e.p50_ms:.1f} = server [{stages}] + rest "
                             f"{e.p50_ms - e.server_p50_ms.get('total', 0):.1f}; "
                             f"{e.response_bytes} B")
        if res["explain_float"]:
            reference = statistics.median(s["figures"]["explain_float"].reference)
            decode = merge_latencies(res["explain_float"]).server_p50_ms.get("decode", 0.0)
            floor_ms = reference + decode + idle_floor
            lines.append(f"  explain floor: benchmark_app p50 {reference:.2f} + decode {decode:.2f}"
                         f" + ServerLive after idle {idle_floor:.2f} = {floor_ms:.2f} ms = "
                         f"{floor_ms / reference:.2f} x benchmark_app")
        if s["rise_batch"]:
            lines.append(f"  RISE reference: benchmark_app plain IR best at batch "
                         f"{s['rise_batch']}")
    noisy = [f"{k} {w:.2f}" for k, w in other_cores(servers).items() if w > NOISY_CORES]
    if noisy:
        lines.append("WARNING: other processes used CPU (cores) during " + ", ".join(noisy)
                     + ": those figures are pessimistic")
    return "\n".join(lines)


def other_cores(servers: dict[str, dict]) -> dict[str, float]:
    """The most CPU that processes not ours used in any window of each kind."""
    out: dict[str, float] = {}
    for label, s in servers.items():
        for ref in s["benchmark_app"]:
            key = f"{label}:ba-{ref.hint}-b{ref.batch}"
            out[key] = max(out.get(key, 0.0), ref.cpu.other_cores)
        for name, values in s["results"].items():
            for v in values:
                key = f"{label}:{name}"
                out[key] = max(out.get(key, 0.0), v.cpu.other_cores)
    return out


def as_json(value: object) -> object:
    """Dataclasses, Paths and Figures as plain JSON values."""
    if isinstance(value, Figure):
        return value.summary()
    if hasattr(value, "__dataclass_fields__"):
        return {k: as_json(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "bench-out/serving_speed_repo",
                        help="where the two IRs are exported once and reused")
    parser.add_argument("--reexport", action="store_true", help="export the IRs again")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds (ours next to benchmark_app) per figure")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--predict-seconds", type=float, default=6.0, help="per round")
    parser.add_argument("--predict-warmup", type=float, default=2.0, help="per round")
    parser.add_argument("--explain-seconds", type=float, default=5.0,
                        help="per round and map format")
    parser.add_argument("--explain-warmup", type=int, default=10, help="calls per round")
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rise-repeats", type=int, default=1, help="RISE calls per round")
    parser.add_argument("--ba-seconds", type=int, default=5, help="benchmark_app -t per run")
    parser.add_argument("--plain-batches", type=int, nargs="+", default=[1, 8, 16],
                        help="batch sizes swept on the plain IR for the RISE reference")
    parser.add_argument("--image-size", type=int, default=224,
                        help="JPEG side; 0 keeps the photo's 451x300")
    parser.add_argument("--no-latency-server", action="store_true",
                        help="skip the second server started with --performance-hint LATENCY")
    parser.add_argument("--rise-on-latency-server", action="store_true")
    parser.add_argument("--server-args", default="", help="extra flags for both servers")
    parser.add_argument("--no-perf-analyzer", dest="perf_analyzer", action="store_false",
                        help="skip the perf_analyzer load (on by default when installed)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, shorter windows")
    parser.add_argument("--only", nargs="+", choices=FIGURE_GROUPS, default=list(FIGURE_GROUPS),
                        help="measure only these figures: more rounds of one in the same time")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out/serving_speed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.predict_seconds, args.explain_seconds = 2, 4.0, 3.0
        args.ba_seconds = 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.perf_analyzer and not perf_analyzer_ready():
        log("perf_analyzer is not installed (scripts/setup_clients.sh): its figure is skipped")
        args.perf_analyzer = False
    started = time.perf_counter()
    load_before = load_average()
    models = ensure_models(args.repository, args.reexport)
    image, image_hw = sample_jpeg(args.image_size)
    log(f"load average {load_before:.2f}; JPEG {image_hw[1]}x{image_hw[0]}, {len(image)} B")
    compiled = {hint: compiled_properties(models[SALIENCY_MODEL], hint)
                for hint in ("THROUGHPUT", "LATENCY")}
    log(f"compiled properties: {compiled}")
    extra = args.server_args.split()
    plans = [("THROUGHPUT", extra, True)]
    if not args.no_latency_server:
        plans.append(("LATENCY", ["--performance-hint", "LATENCY", *extra],
                      args.rise_on_latency_server))
    servers: dict[str, dict] = {}
    for label, flags, rise in plans:
        with running_server(args.repository, label, flags, args.out.parent) as server:
            servers[label] = run_server_rounds(server, models, image, args,
                                               rise and "rise" in args.only)
    text = table(servers, args)
    print(text)
    elapsed = time.perf_counter() - started
    args.out.write_text(json.dumps(as_json({
        "settings": vars(args),
        "image": {"width": image_hw[1], "height": image_hw[0], "jpeg_bytes": len(image)},
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": load_average()},
        "compiled": compiled,
        "summary": [f for s in servers.values() for f in s["figures"].values()],
        "servers": servers,
        "other_cores": other_cores(servers),
        "elapsed_s": elapsed,
        "table": text,
    }), indent=2) + "\n")
    log(f"wrote {args.out} ({elapsed:.0f} s)")
    passed = all(f.passed for s in servers.values() for f in s["figures"].values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
