"""`xaiserve bench`: throughput and latency of a model the way benchmark_app and perf_analyzer
measure them, in-process (the compiled model with our request handling) and through a running
server (the same plus gRPC), so the serving overhead is the difference.

A point is one (mode, model configuration, work, batch, concurrency). Its clients call back to
back; after a warm-up, completed requests are counted in consecutive windows (a time or a request
count), and the point is accepted once the last `stable_windows` windows agree on throughput and
p50 within `stability` of their mean (perf_analyzer's rule), or reported `stable: false` after
`max_windows`. Figures come from the accepted windows only.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import openvino as ov

from . import bench_works as works
from .bench_load import (Measurement, PointFailed, Window, describe_error, measure,
                         request_split)
from .bench_reference import ReferenceRun, run_benchmark_app
from .bench_settings import BenchError, BenchSettings
from .cpu_int8 import cpu_flags, cpu_name, int8_dot_product
from .images import ImageError, decode_image, read_image_file
from .layer_profile import LayerProfile, measure_layers, profile
from .model import ClassifierModel, ModelLoadError, error_reason
from .rest_client import RestError, model_path, rest_address

MODES = ("in-process", "server", "server-stream", "server-rest")
# RemoteTarget.protocol -> the points' mode
REMOTE_MODES = {"grpc": "server", "grpc-stream": "server-stream", "http": "server-rest",
                "https": "server-rest"}
# OPTIMIZATION_CAPABILITIES a device must list for an inference precision.
PRECISION_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
META_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")
HINT_SHORT = {"LATENCY": "lat", "THROUGHPUT": "tput", "CUMULATIVE_THROUGHPUT": "ctput"}


# --- results -----------------------------------------------------------------------------------

@dataclass
class Point:
    """One measured point, with its ratio to benchmark_app on the same IR and settings."""

    mode: str
    model: str
    device: str
    precision: str
    hint: str
    streams: str
    work: str
    batch: int
    concurrency: int
    requests: int
    seconds: float
    throughput: float  # images/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    stable: bool
    windows: int
    errors: int
    split_ms: dict[str, float]
    first_error: str = ""
    reference_fps: float | None = None
    reference_p50_ms: float | None = None
    throughput_ratio: float | None = None  # ours / benchmark_app (higher is better, 1 = limit)
    p50_ratio: float | None = None  # ours / benchmark_app (lower is better, 1 = limit)
    window_log: list[dict] = field(default_factory=list)

    @property
    def config(self) -> str:
        return config_text(self)


def config_text(p: "Point | Config") -> str:
    """'CPU default tput st=auto': the compile settings of an in-process point."""
    hint = HINT_SHORT.get(p.hint, p.hint.lower())
    return f"{p.device} {p.precision} {hint} st={p.streams}"


@dataclass
class BenchResult:
    settings: dict
    environment: dict
    image: str
    points: list[Point] = field(default_factory=list)
    references: list[ReferenceRun] = field(default_factory=list)
    layers: list[LayerProfile] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)
    # The points whose requests all failed (also among skips): the run goes on without them.
    failed: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: str = ""  # the signal that ended the run early; the points before it are kept

    def as_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def point_from(measurement: Measurement, *, mode: str, model: str, device: str, precision: str,
               hint: str, streams: str, work: str, batch: int, concurrency: int) -> Point:
    latencies = [s.latency_ms for s in measurement.samples]
    p50, p90, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 90, 95, 99]))
    return Point(mode, model, device, precision, hint, streams, work, batch, concurrency,
                 len(latencies), measurement.seconds,
                 len(latencies) * batch / measurement.seconds, p50, p90, p95, p99,
                 float(np.mean(latencies)), measurement.stable, len(measurement.windows),
                 measurement.errors, request_split(measurement.samples, mode != "in-process"),
                 measurement.first_error,
                 window_log=[asdict(w) for w in measurement.windows])


def attach_reference(point: Point, ref: ReferenceRun | None, masks: int) -> None:
    """Ratios against benchmark_app. A black-box request is masks + 1 inferences, so its limit
    is that many images at benchmark_app's rate, for throughput and for latency alike."""
    per_request = works.WORKS[point.work].inferences(point.batch, masks)
    if ref is None or not ref.fps or per_request is None:
        return
    point.reference_fps = ref.fps
    point.reference_p50_ms = ref.p50_ms if per_request == point.batch else \
        per_request / ref.fps * 1e3
    point.throughput_ratio = point.throughput * per_request / point.batch / ref.fps
    point.p50_ratio = point.p50_ms / point.reference_p50_ms if point.reference_p50_ms else None


# --- what runs ---------------------------------------------------------------------------------

class Progress:
    """Hooks for a progress display; the CLI draws a bar, the library stays quiet."""

    def start(self, total: int) -> None: ...
    def begin(self, label: str) -> None: ...
    def window(self, window: Window, index: int) -> None: ...
    def advance(self) -> None: ...
    def note(self, line: str) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Config:
    """One way to compile the model in-process (and to run benchmark_app beside it)."""

    path: Path
    device: str
    precision: str
    hint: str
    streams: str

    @property
    def xml(self) -> Path:
        return self.path if self.path.suffix == ".xml" else self.path / "model.xml"

    @property
    def label(self) -> str:
        return model_label(self.path)

    def compile_config(self) -> dict[str, str]:
        config = {"PERFORMANCE_HINT": self.hint}
        if self.precision in PRECISION_CAPABILITY:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if self.streams != "auto":
            config["NUM_STREAMS"] = self.streams
        return config


def model_label(path: Path) -> str:
    """models/NAME/3 -> NAME/3; models/NAME/3/model.xml -> NAME/3."""
    directory = path.parent if path.suffix == ".xml" else path
    return f"{directory.parent.name}/{directory.name}"


def device_skip(core: ov.Core, device: str) -> str | None:
    available = core.available_devices
    base = device.split(":")[0]
    if base in META_DEVICES:
        return None if available else f"skip {device}: no device present"
    if device in available or (device.isalpha() and any(
            d.split(".")[0] == device for d in available)):
        return None
    return f"skip {device}: not present (available: {', '.join(available) or 'none'})"


def precision_skip(core: ov.Core, device: str, precision: str) -> str | None:
    """bf16 on a CPU without AMX/AVX512_BF16 (or f16 where it is absent) is skipped, saying so."""
    needed = PRECISION_CAPABILITY.get(precision)
    if needed is None or device.split(":")[0] in META_DEVICES:
        return None
    try:
        capabilities = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # noqa: BLE001 - a plugin that cannot say is tried as asked
        return None
    if needed in capabilities:
        return None
    return (f"skip {device} {precision}: the device has no {needed} "
            f"(OPTIMIZATION_CAPABILITIES: {' '.join(capabilities)})")


def environment(core: ov.Core) -> dict:
    """What the figures depend on; `cpu_int8` says whether this CPU's INT8 sums saturate (no
    VNNI), which changes what an INT8 IR computes here (service/cpu_int8.py)."""
    return {"openvino": ov.get_version(), "devices": list(core.available_devices),
            "cpu": cpu_name(), "cpu_int8": int8_dot_product(cpu_flags()),
            "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}


class Bench:
    """Runs every planned point and reference; the result is plain data for bench_report."""

    def __init__(self, settings: BenchSettings, progress: Progress | None = None,
                 core: ov.Core | None = None):
        self.settings = settings.validate()
        self.progress = progress or Progress()
        self.core = core or ov.Core()
        try:
            if settings.image is not None:
                self.jpeg, what = read_image_file(settings.image), str(settings.image)
            else:
                self.jpeg, what = works.sample_jpeg()
            self.rgb = decode_image(self.jpeg)  # for --layers; the works decode their own
        except ImageError as exc:
            raise BenchError(f"--image {settings.image}: {exc}") from None
        self.work_input = works.WorkInput(self.jpeg, settings.masks, settings.seed)
        self.result = BenchResult(_plain(settings.record()), environment(self.core), what)
        self._references: dict[tuple, ReferenceRun | None] = {}

    # planning ----------------------------------------------------------------------------

    def local_configs(self) -> list[Config]:
        s, configs = self.settings, []
        for device in s.devices:
            skip = device_skip(self.core, device)
            if skip:
                self.skip(skip)
                continue
            for precision in s.precisions:
                skip = precision_skip(self.core, device, precision)
                if skip:
                    self.skip(skip)
                    continue
                configs.extend(Config(path, device, precision, hint, streams)
                               for path in s.model_paths for hint in s.hints
                               for streams in s.streams)
        return configs

    def jobs(self, mode: str) -> list[tuple[str, int, int]]:
        """(work, batch, concurrency) runnable in this mode; skip lines for the rest."""
        out = []
        for name in self.settings.works:
            for batch in self.settings.batch_sizes:
                reason = works.WORKS[name].skip_reason(mode, batch)
                if reason:
                    self.skip(f"skip {reason}")
                    continue
                out.extend((name, batch, c) for c in self.settings.concurrency)
        return out

    def skip(self, line: str) -> None:
        if line not in self.result.skips:
            self.result.skips.append(line)
            self.progress.note(line)

    # running -----------------------------------------------------------------------------

    def run(self) -> BenchResult:
        started = time.perf_counter()
        # The server is checked first, so that a wrong address fails before any work.
        remote = self.remote_target() if self.settings.server else None
        configs = self.local_configs() if self.settings.model_paths else []
        local_jobs = self.jobs("in-process") if configs else []
        remote_jobs = self.jobs("server") if self.settings.server else []
        profiles = len(configs) * len(self.settings.batch_sizes) if self.settings.layers else 0
        total = len(configs) * len(local_jobs) + len(remote_jobs) + profiles
        self.progress.start(total)
        try:
            for config in configs:
                self.run_local(config, local_jobs)
            if remote is not None:
                self.run_remote(remote, remote_jobs)
        except KeyboardInterrupt as exc:
            # A pipeline's timeout or Ctrl-C: minutes of points already measured are kept.
            # benchmark_app, if it was running, was killed by subprocess.run on the way out.
            self.result.interrupted = str(exc) or "SIGINT"
            self.skip(f"interrupted ({self.result.interrupted}) after {len(self.result.points)}"
                      f" of {total} points: the rest were not measured")
        finally:
            self.progress.close()
        self.result.environment["load_average_after"] = os.getloadavg()[0]
        self.result.elapsed_s = time.perf_counter() - started
        return self.result

    def run_local(self, config: Config, jobs: list[tuple[str, int, int]]) -> None:
        if self.settings.layers:
            self.profile_layers(config)
        try:
            model = ClassifierModel(config.path, config.device, config.compile_config(),
                                    self.core).load()
        except (ModelLoadError, RuntimeError) as exc:
            self.skip(f"skip {config.label} {config.device} {config.precision}: cannot compile "
                      f"({error_reason(exc, 160)})")
            for _ in jobs:
                self.progress.advance()
            return
        try:
            for work, batch, concurrency in jobs:
                self.progress.begin(f"in-process {work} b{batch} c{concurrency}")
                try:
                    calls = [works.WORKS[work].local(model, self.work_input, batch)
                             for _ in range(concurrency)]
                except works.Unsupported as exc:
                    self.skip(f"skip {work} in-process on {config.label}: {exc}")
                    self.progress.advance()
                    continue
                point = self._measure(calls, "in-process", config, work, batch, concurrency)
                if point is not None:
                    attach_reference(point, self.reference(config, batch, model),
                                     self.settings.masks)
                self.progress.advance()
        finally:
            del model
            gc.collect()

    def run_remote(self, remote: tuple[works.RemoteTarget, str],
                   jobs: list[tuple[str, int, int]]) -> None:
        s = self.settings
        target, served = remote
        ref_config = Config(s.model_paths[0], s.devices[0], "default", s.hints[0], "auto") \
            if s.model_paths else None
        if ref_config is None and s.reference:
            self.skip("skip benchmark_app for the server: give --model-path with the IR it serves")
        label = f"{s.model}/{served}"
        server_config = Config(Path(label), "server", "server", "server", "server")
        mode = REMOTE_MODES[target.protocol]
        for work, batch, concurrency in jobs:
            self.progress.begin(f"{mode} {work} b{batch} c{concurrency}")
            calls = [works.WORKS[work].remote(target, self.work_input, batch)
                     for _ in range(concurrency)]
            point = self._measure(calls, mode, server_config, work, batch, concurrency)
            if point is not None:
                point.model = label
                if ref_config is not None:
                    attach_reference(point, self.reference(ref_config, batch), s.masks)
            self.progress.advance()

    def profile_layers(self, config: Config) -> None:
        """Per-layer counters of the IR under this configuration, one profile per batch size,
        on a copy compiled for them alone (PERF_COUNT slows the points' inferences)."""
        for batch in self.settings.batch_sizes:
            self.progress.begin(f"layer counters b{batch}")
            try:
                layers = measure_layers(self.core, config.xml, config.device,
                                        config.compile_config(), batch, self.rgb,
                                        self.settings.layer_iterations)
            except (RuntimeError, ValueError) as exc:
                self.skip(f"skip layer counters {config.label} {config.device} b{batch}: "
                          f"{error_reason(exc, 160)}")
            else:
                self.result.layers.append(profile(
                    layers, model=config.label, device=config.device,
                    precision=config.precision, hint=config.hint, streams=config.streams,
                    batch=batch, iterations=self.settings.layer_iterations))
            self.progress.advance()

    def remote_target(self) -> tuple[works.RemoteTarget, str]:
        """The server's address and model, checked, and the version it serves."""
        s = self.settings
        address = rest_address(s.server)
        if address:
            protocol = "https" if s.server.startswith("https://") else "http"
            return self.rest_target(works.RemoteTarget(address, s.model, s.version,
                                                       protocol=protocol, access=s.access))
        target = works.RemoteTarget(s.server, s.model, s.version, access=s.access,
                                    protocol="grpc-stream" if s.streaming else "grpc")
        client = target.grpc_client(timeout=10)
        try:
            client.wait_ready(timeout=5)
            info = client.model_info(s.model, s.version)
        except grpc.FutureTimeoutError:
            raise BenchError(f"--server {s.server}: not reachable; start `xaiserve serve` "
                             "or fix the address") from None
        except grpc.RpcError as exc:
            raise BenchError(f"--model {s.model}: {describe_error(exc)}") from None
        finally:
            client.close()
        if not info.ready:
            raise BenchError(f"--model {s.model}: not ready on the server ({info.reason})")
        size = (int(info.input_height), int(info.input_width))
        return replace(target, input_hw=size), info.model_version

    def rest_target(self, target: works.RemoteTarget) -> tuple[works.RemoteTarget, str]:
        """The same over the REST side: the model's metadata and configuration (the version
        that serves is among the configuration's parameters)."""
        s = self.settings
        client = target.rest_client(timeout=10)
        try:
            metadata = client.get(model_path(s.model, s.version))
            config = client.get(model_path(s.model, s.version, "config"))
        except OSError as exc:
            raise BenchError(f"--server {s.server}: not reachable ({exc.strerror or exc}); "
                             "start `xaiserve serve --rest-port PORT` or fix the address") \
                from None
        except RestError as exc:
            raise BenchError(f"--model {s.model}: {exc.message}") from None
        finally:
            client.close()
        _, height, width, _ = metadata["inputs"][0]["shape"]
        return (replace(target, input_hw=(int(height), int(width))),
                config["parameters"]["version"]["string_value"])

    def _measure(self, calls, mode: str, config: Config, work: str, batch: int,
                 concurrency: int) -> Point | None:
        """The point, kept in the result; None when its requests all failed: a skip line says
        so and the run goes on, so the points measured before and after it are not lost."""
        try:
            measurement = measure(calls, batch, self.settings, self.progress.window)
        except PointFailed as exc:
            where = config.label if mode != "in-process" else \
                f"{config.label} {config_text(config)}"
            line = f"skip {mode} {where} {work} b{batch} c{concurrency}: {exc}"
            self.result.failed.append(line)
            self.skip(line)
            return None
        point = point_from(measurement, mode=mode, model=config.label, device=config.device,
                           precision=config.precision, hint=config.hint, streams=config.streams,
                           work=work, batch=batch, concurrency=concurrency)
        self.result.points.append(point)
        return point

    def reference(self, config: Config, batch: int,
                  model: ClassifierModel | None = None) -> ReferenceRun | None:
        """benchmark_app on the same IR, device, precision, hint, streams and batch; run once
        per combination and shared by its points."""
        if not self.settings.reference:
            return None
        key = (config.xml, config.device, config.precision, config.hint, config.streams, batch)
        if key not in self._references:
            self.progress.begin(f"benchmark_app b{batch} {config.hint.lower()} "
                                f"({self.settings.reference_seconds} s)")
            hw = (model.info.input_height, model.info.input_width) if model else \
                self._input_hw(config.xml)
            try:
                ref = run_benchmark_app(config.xml, hint=config.hint, batch=batch,
                                        seconds=self.settings.reference_seconds,
                                        device=config.device, input_hw=hw,
                                        precision=config.precision, streams=config.streams)
                self.result.references.append(ref)
            except (RuntimeError, ValueError, OSError) as exc:
                self.skip(f"skip benchmark_app {config.label} {config.device} b{batch}: {exc}")
                ref = None
            self._references[key] = ref
        return self._references[key]

    def _input_hw(self, xml: Path) -> tuple[int, int]:
        from .model_info import ModelInfo

        info = ModelInfo.from_model(self.core.read_model(str(xml)))
        return (info.input_height, info.input_width) if info else (224, 224)


def run_bench(settings: BenchSettings, progress: Progress | None = None) -> BenchResult:
    return Bench(settings, progress).run()
