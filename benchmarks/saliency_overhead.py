"""Latency cost of the in-graph saliency branch at batch 1 on CPU.

For each source, export a plain IR (`--method none`) and one with saliency (`--method auto`)
into a temporary repository, compile both with the same settings (LATENCY hint), and measure
synchronous batch-1 latency the way benchmark_app does: warm up, then infer back to back for a
measurement window and report the median, the mean and the throughput. The two models are
measured in alternating rounds so that machine noise hits both alike. OpenVINO's own
benchmark_app is then run on both IRs as a cross-check.

    python benchmarks/saliency_overhead.py                      # default and timm:resnet50
    python benchmarks/saliency_overhead.py --with-deit --f32    # + DeiT-Tiny, + an f32 pass
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from back_to_back import Timing, measure_interleaved
from xaiserve.export.pipeline import ExportRequest, export_model
from xaiserve.export.saliency import SaliencySettings
from xaiserve.export.sources import SourceOptions
from xaiserve.service.model import compiled_precision

DEFAULT_SOURCES = ["default", "timm:resnet50"]
DEIT_SOURCE = "timm:deit_tiny_patch16_224"
VARIANTS = ("plain", "saliency")
TARGET_RATIO = 1.10
BUSY_LOAD = 3.0  # our own inference threads (2 here) keep the load average near 2


@dataclass
class Exported:
    """One exported IR and what the benchmark needs to know about it."""

    variant: str
    xml: Path
    bin_bytes: int
    input_shape: list[int]  # batch-1 u8 NHWC
    saliency: dict | None


@dataclass
class PrecisionResult:
    """Both variants of one source compiled in one precision."""

    requested: str  # "default" or "f32"
    execution_precision: str
    threads: int
    streams: int
    ours: dict[str, Timing] = field(default_factory=dict)
    benchmark_app: dict[str, Timing] | None = None
    benchmark_app_error: str | None = None
    load_before: float | None = None  # 1-min load average around our measurement
    load_after: float | None = None

    def ratio(self, which: str = "ours", stat: str = "p50_ms") -> float | None:
        """saliency/plain of one statistic."""
        timings = self.ours if which == "ours" else self.benchmark_app
        if not timings:
            return None
        return getattr(timings["saliency"], stat) / getattr(timings["plain"], stat)

    def paired_ratio(self) -> float:
        """Median over rounds of saliency/plain round medians: robust to load that changes
        between rounds (both models of a round saw about the same load)."""
        plain, sal = self.ours["plain"].round_p50_ms, self.ours["saliency"].round_p50_ms
        return statistics.median(s / p for s, p in zip(sal, plain))


# --- export -----------------------------------------------------------------------------------

def seed_torch(seed: int) -> None:
    """Seed torch if it is installed (it is whenever a torch-based source can be exported)."""
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def export_pair(source: str, repository: Path, log, map_precision: str = "auto"
                ) -> dict[str, Exported]:
    """Export `source` twice: without and with the saliency branch."""
    methods = {"plain": "none", "saliency": "auto"}
    pair: dict[str, Exported] = {}
    for variant in VARIANTS:
        seed_torch(0)  # random-weight sources (timm without a checkpoint) get the same weights
        t = time.perf_counter()
        result = export_model(ExportRequest(
            source=source, repository=repository, name=variant,
            saliency=SaliencySettings(method=methods[variant], map_precision=map_precision),
            source_options=SourceOptions(random_weights=True),  # timm: untrained is enough
        ))
        xml = result.path / "model.xml"
        shape = list(result.card["input"]["shape"])
        shape[0] = 1
        pair[variant] = Exported(variant, xml, xml.with_suffix(".bin").stat().st_size, shape,
                                 result.card["saliency"])
        log(f"  exported {variant:<8} in {time.perf_counter() - t:5.1f} s "
            f"({pair[variant].bin_bytes / 2**20:.1f} MiB .bin)")
    return pair


# --- our measurement loop ---------------------------------------------------------------------

def compile_config(precision: str, profile: bool = False) -> dict:
    """Identical settings for both variants; `precision` "default" leaves the CPU's choice."""
    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    if profile:
        config["PERF_COUNT"] = True
    return config


def make_request(core: ov.Core, model: Exported, config: dict,
                 image: np.ndarray) -> tuple[ov.CompiledModel, ov.InferRequest]:
    """Compile with `config`, reshaped to batch 1, with the input set once."""
    read = core.read_model(model.xml)
    read.reshape({"image": ov.PartialShape(model.input_shape)})
    compiled = core.compile_model(read, "CPU", config)
    request = compiled.create_infer_request()
    request.set_tensor("image", ov.Tensor(image))
    return compiled, request


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def top_layers(request: ov.InferRequest, count: int) -> list[dict]:
    """The slowest executed layers of the last inference (needs PERF_COUNT)."""
    rows = [
        {"name": p.node_name, "type": p.node_type, "exec_type": p.exec_type,
         "us": p.real_time.total_seconds() * 1e6}
        for p in request.get_profiling_info() if p.status == p.Status.EXECUTED
    ]
    return sorted(rows, key=lambda r: -r["us"])[:count]


# --- benchmark_app ----------------------------------------------------------------------------

_BA_FIELDS = {"Median": "p50_ms", "Average": "mean_ms", "Min": "min_ms", "Max": "max_ms"}


def benchmark_app_path() -> Path | None:
    here = Path(sys.executable).with_name("benchmark_app")
    if here.exists():
        return here
    found = shutil.which("benchmark_app")
    return Path(found) if found else None


def parse_benchmark_app(text: str) -> Timing:
    """The `Count`, `Latency: Median/Average/Min/Max` and `Throughput` lines of its report."""
    values: dict[str, float] = {}
    for label, name in _BA_FIELDS.items():
        m = re.search(rf"^\[ INFO \]\s+{label}:\s+([\d.]+) ms", text, re.M)
        if m:
            values[name] = float(m.group(1))
    count = re.search(r"^\[ INFO \] Count:\s+(\d+)", text, re.M)
    fps = re.search(r"^\[ INFO \] Throughput:\s+([\d.]+) FPS", text, re.M)
    if "p50_ms" not in values or "mean_ms" not in values or not fps:
        raise ValueError("no latency/throughput lines in its output")
    return Timing(fps=float(fps.group(1)), count=int(count.group(1)) if count else 0, **values)


def run_benchmark_app(model: Exported, precision: str, seconds: int) -> Timing:
    exe = benchmark_app_path()
    if exe is None:
        raise FileNotFoundError("benchmark_app is not installed next to this Python or on PATH")
    shape = ",".join(str(d) for d in model.input_shape)
    cmd = [str(exe), "-m", str(model.xml), "-d", "CPU", "-hint", "latency", "-t", str(seconds),
           "-shape", f"image[{shape}]"]
    if precision != "default":
        cmd += ["-infer_precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 240)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return parse_benchmark_app(proc.stdout)


def benchmark_app_pair(pair: dict[str, Exported], precision: str, seconds: int,
                       log) -> tuple[dict[str, Timing] | None, str | None]:
    """benchmark_app on both IRs, one after the other; (timings, None) or (None, why not)."""
    timings = {}
    try:
        for variant in VARIANTS:
            timings[variant] = run_benchmark_app(pair[variant], precision, seconds)
            log(f"    benchmark_app {variant:<8} median {timings[variant].p50_ms:.2f} ms")
    except Exception as exc:  # noqa: BLE001 - report and go on with the rest
        why = f"{type(exc).__name__}: {exc}"
        log(f"    benchmark_app failed: {why}")
        return None, why
    return timings, None


# --- one source -------------------------------------------------------------------------------

def bench_precision(core: ov.Core, pair: dict[str, Exported], precision: str,
                    args: argparse.Namespace, log) -> tuple[PrecisionResult, dict]:
    """Compile both IRs alike, measure them interleaved, then run benchmark_app on both."""
    image = np.random.default_rng(0).integers(0, 256, pair["plain"].input_shape, dtype=np.uint8)
    config = compile_config(precision, args.profile)
    compiled, requests = {}, {}
    for variant in VARIANTS:
        compiled[variant], requests[variant] = make_request(core, pair[variant], config, image)
    probe = compiled["plain"]
    result = PrecisionResult(
        requested=precision,
        execution_precision=compiled_precision(probe),
        threads=int(probe.get_property("INFERENCE_NUM_THREADS")),
        streams=int(probe.get_property("NUM_STREAMS")),
    )
    log(f"  [{precision}] executes in {result.execution_precision}, "
        f"{result.threads} threads, {result.streams} stream(s)")
    result.load_before = load_average()
    result.ours = measure_interleaved(requests, args.warmup, args.seconds, args.rounds)
    result.load_after = load_average()
    for variant in VARIANTS:
        t = result.ours[variant]
        log(f"    ours {variant:<8} p50 {t.p50_ms:.2f} ms  mean {t.mean_ms:.2f} ms  "
            f"p10 {t.p10_ms:.2f} ms  cpu {t.cpu_ms:.2f} ms ({t.count} inferences)")
    log(f"    load average {result.load_before} -> {result.load_after}")
    profile = {v: top_layers(requests[v], args.profile_top) for v in VARIANTS} \
        if args.profile else {}
    del requests, compiled
    if args.benchmark_app_seconds > 0:
        result.benchmark_app, result.benchmark_app_error = benchmark_app_pair(
            pair, precision, args.benchmark_app_seconds, log)
    return result, profile


def bench_source(source: str, args: argparse.Namespace, log) -> dict:
    """Export the pair into a temporary repository and measure it in each precision."""
    log(f"{source}:")
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="saliency-overhead-") as tmp:
        pair = export_pair(source, Path(tmp), log, args.map_precision)
        precisions = ["default"] + (["f32"] if args.f32 else [])
        results, profiles = {}, {}
        for precision in precisions:
            results[precision], profiles[precision] = bench_precision(core, pair, precision,
                                                                      args, log)
    return {
        "source": source,
        "bin_bytes": {v: pair[v].bin_bytes for v in VARIANTS},
        "bin_ratio": pair["saliency"].bin_bytes / pair["plain"].bin_bytes,
        "input_shape": pair["plain"].input_shape,
        "saliency": pair["saliency"].saliency,
        "results": {
            p: {**asdict(r), "ratio_p50": r.ratio("ours"), "ratio_p10": r.ratio("ours", "p10_ms"),
                "ratio_cpu": r.ratio("ours", "cpu_ms"),
                "ratio_paired": r.paired_ratio(),
                "benchmark_app_ratio_median": r.ratio("benchmark_app")}
            for p, r in results.items()
        },
        "profile": profiles if args.profile else None,
    }


# --- report -----------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    """One row per (source, precision)."""
    head = (f"{'source':<28} {'precision':<12} {'plain p50':>9} {'sal p50':>9} {'ratio':>6} "
            f"{'paired':>6} {'p10 x':>6} {'cpu x':>6} {'plain mean':>10} {'sal mean':>9} {'plain fps':>9} "
            f"{'sal fps':>8} {'ba ratio':>8} {'plain MiB':>9} {'sal MiB':>8} {'bin x':>6} "
            f"{'load':>4}  ok")
    lines = [head, "-" * len(head)]
    busy = False
    for rec in records:
        for precision, r in rec["results"].items():
            p, s = r["ours"]["plain"], r["ours"]["saliency"]
            ok = "yes" if r["ratio_p50"] <= TARGET_RATIO else "NO"
            load = max((x for x in (r["load_before"], r["load_after"]) if x is not None),
                       default=None)
            busy = busy or (load is not None and load > BUSY_LOAD)
            lines.append(
                f"{rec['source']:<28} {precision + '/' + r['execution_precision']:<12} "
                f"{p['p50_ms']:9.2f} {s['p50_ms']:9.2f} {r['ratio_p50']:6.3f} "
                f"{r['ratio_paired']:6.3f} {r['ratio_p10']:6.3f} {r['ratio_cpu']:6.3f} "
                f"{p['mean_ms']:10.2f} {s['mean_ms']:9.2f} {p['fps']:9.1f} {s['fps']:8.1f} "
                f"{_fmt(r['benchmark_app_ratio_median'], '8.3f')} "
                f"{rec['bin_bytes']['plain'] / 2**20:9.2f} "
                f"{rec['bin_bytes']['saliency'] / 2**20:8.2f} {rec['bin_ratio']:6.3f} "
                f"{_fmt(load, '4.1f')}  {ok}"
            )
    lines.append(
        f"(ms, batch 1, sync. ratio = saliency/plain p50 (target <= {TARGET_RATIO:.2f}); paired = "
        "median of per-round ratios; p10 x = ratio of 10th percentiles; cpu x = ratio of process "
        "CPU time per inference (least sensitive to other processes); ba = benchmark_app "
        "median ratio; load = 1-min load average)")
    if busy:
        lines.append(f"WARNING: load average above {BUSY_LOAD} while measuring: other processes "
                     "shared the CPU; trust the cpu x and paired ratios more than absolute times")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES,
                        help="export sources (default: %(default)s)")
    parser.add_argument("--with-deit", action="store_true", help=f"also {DEIT_SOURCE}")
    parser.add_argument("--f32", action="store_true",
                        help="also measure with INFERENCE_PRECISION_HINT=f32")
    parser.add_argument("--map-precision", default="auto", choices=["auto", "f32", "int8"],
                        help="the saliency IR's map product (export --map-precision)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="measurement time per model, split over the rounds")
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per model")
    parser.add_argument("--benchmark-app-seconds", type=int, default=10,
                        help="benchmark_app -t per IR; 0 skips benchmark_app")
    parser.add_argument("--profile", action="store_true",
                        help="compile with PERF_COUNT and record the slowest layers")
    parser.add_argument("--profile-top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench-out/saliency_overhead.json"))
    args = parser.parse_args(argv)
    if args.with_deit and DEIT_SOURCE not in args.sources:
        args.sources = [*args.sources, DEIT_SOURCE]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    records = [bench_source(source, args, log) for source in args.sources]
    print(table(records))
    if args.profile:
        for rec in records:
            for precision, profile in rec["profile"].items():
                print(f"\n{rec['source']} [{precision}] slowest layers of one inference (us):")
                for variant, rows in profile.items():
                    print(f"  {variant}:")
                    for row in rows:
                        print(f"    {row['us']:9.1f}  {row['exec_type']:<28} {row['type']:<14} "
                              f"{row['name']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "openvino": ov.get_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": records,
    }, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
