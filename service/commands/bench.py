"""`xaiserve bench`: options to BenchSettings, the run with a progress bar, the files and the
one-screen summary."""

from __future__ import annotations

import sys
from pathlib import Path

from ..interrupts import interrupts_raised
from ..layout import resolve_version_dir
from .common import (EXIT_INTERRUPTED, add_access_options, bounded_int, fail, prepared_out,
                     server_access)

EXIT_SOME_FAILED = 1  # some points were measured and written, others failed every request


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency in-process and through a server, "
                                     "next to benchmark_app; JSON, CSV, PNG plots, a summary")
    p.add_argument("--model-path", type=Path, action="append", default=[],
                   help="models/<name> (newest version) or models/<name>/<v>; repeat to compare "
                        "IRs (f32, INT8); with --server: the IR it serves, for benchmark_app")
    p.add_argument("--server", help="HOST:PORT of a running `xaiserve serve` (gRPC), or "
                   "http[s]://HOST:PORT for its REST side (`serve --rest-port`)")
    p.add_argument("--streaming", action="store_true",
                   help="with --server HOST:PORT: each client sends its requests over one "
                        "stream (ModelStreamInfer, ExplainStream), one in flight, as "
                        "perf_analyzer --streaming")
    p.add_argument("--model", help="model name on the server")
    p.add_argument("--version", default="", help="a version of --model on the server, or of "
                   "each --model-path models/<name> (default: the newest)")
    p.add_argument("--works", default="predict,explain-white",
                   help="comma list of predict, explain-white, explain-black, faithfulness")
    p.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    p.add_argument("--concurrency", default="1", help="concurrent clients, e.g. 1,4,8")
    p.add_argument("--device", default="CPU", help="in-process devices, e.g. CPU,GPU,NPU,AUTO")
    p.add_argument("--precision", default="default",
                   help="default,f32,bf16,f16 (INFERENCE_PRECISION_HINT; default: the device's)")
    p.add_argument("--hint", default="THROUGHPUT", help="LATENCY,THROUGHPUT,...")
    p.add_argument("--streams", default="auto", help="NUM_STREAMS values, e.g. auto,1,2")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--window", type=float, default=3.0, help="seconds per measurement window")
    p.add_argument("--window-count", type=int, default=0,
                   help="requests per window instead of --window seconds")
    p.add_argument("--stability", type=float, default=10.0,
                   help="percent: accept when the last --stable-windows windows' throughput "
                        "and p50 lie within this of their mean")
    p.add_argument("--stable-windows", type=int, default=3, help="at least 2")
    p.add_argument("--max-windows", type=int, default=10,
                   help="at least --stable-windows; after this many windows the point is "
                        "reported with stable: false")
    p.add_argument("--masks", type=int, default=500, help="black-box (RISE) masks")
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0)
    p.add_argument("--image", type=Path, default=None, help="default: a sample photo")
    p.add_argument("--reference-seconds", type=int, default=10, help="benchmark_app -t")
    p.add_argument("--no-reference", action="store_true", help="do not run benchmark_app")
    p.add_argument("--layers", action="store_true",
                   help="also read per-layer counters (PERF_COUNT) of each in-process "
                        "configuration and batch: time by layer type, kernel and precision")
    p.add_argument("--layer-iterations", type=int, default=100,
                   help="inferences averaged for --layers")
    p.add_argument("--out", type=Path, default=Path("bench"))
    add_access_options(p)
    p.set_defaults(run=run_bench)


def comma_list(option: str, text: str, kind=str) -> tuple:
    values = [v.strip() for v in text.split(",") if v.strip()]
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"{option} {text!r}: give a comma list, e.g. 1,4,8") from None


class BenchBar:
    """tqdm over the points; skip lines and benchmark_app runs printed above it."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None

    def start(self, total: int) -> None:
        self.bar = self._tqdm(total=total, desc="bench", unit="point", file=sys.stderr)

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def window(self, window, index: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"window {index}: {window.throughput:.1f} img/s, "
                                     f"p50 {window.p50_ms:.1f} ms")

    def advance(self) -> None:
        self.bar.update(1)

    def note(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(args) -> int:
    from ..bench import Bench
    from ..bench_settings import BenchError, BenchSettings
    from ..bench_report import write_all

    try:
        paths = tuple(resolve_version_dir(p, args.version) for p in args.model_path)
        settings = BenchSettings(
            model_paths=paths, server=args.server, streaming=args.streaming, model=args.model,
            version=args.version,
            access=server_access(args), token_file=args.token_file,
            works=comma_list("--works", args.works),
            batch_sizes=comma_list("--batch", args.batch, int),
            concurrency=comma_list("--concurrency", args.concurrency, int),
            devices=comma_list("--device", args.device),
            precisions=comma_list("--precision", args.precision.lower()),
            hints=comma_list("--hint", args.hint.upper()),
            streams=comma_list("--streams", args.streams.lower()),
            warmup_s=args.warmup, window_s=args.window, window_count=args.window_count,
            stability=args.stability / 100, stable_windows=args.stable_windows,
            max_windows=args.max_windows, masks=args.masks, seed=args.seed, image=args.image,
            reference=not args.no_reference, reference_seconds=args.reference_seconds,
            layers=args.layers, layer_iterations=args.layer_iterations)
        prepared_out(args.out)
        with interrupts_raised():  # SIGTERM too: keep the points measured, end benchmark_app
            result = Bench(settings, BenchBar()).run()
            if not result.points and not result.layers:
                if result.interrupted:
                    raise KeyboardInterrupt(f"{result.interrupted}; nothing was measured")
                return fail("bench", "nothing was measured: " + "; ".join(result.skips))
            written = write_all(result, args.out)
    except (BenchError, ValueError, FileNotFoundError) as exc:
        return fail("bench", str(exc))
    print(written["summary"].read_text(), end="")
    print(f"wrote {', '.join(str(v) for v in written.values())}", file=sys.stderr)
    if result.interrupted:
        print(f"xaiserve bench: {result.interrupted}; what was measured before it is written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed:
        total = len(result.failed) + len(result.points)
        print(f"xaiserve bench: {len(result.failed)} of {total} points failed every request "
              f"(their skip lines are above); the points measured are written", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
