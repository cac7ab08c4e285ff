"""What `xaiserve bench` leaves behind: bench.json and bench.csv for machines, PNG plots and a
one-screen text summary for people. Every figure is shown next to its ratio to benchmark_app."""

from __future__ import annotations

import csv
from pathlib import Path

from . import atomic_file, json_values
from .bench import HINT_SHORT, BenchResult, Point
from .bench_load import STAGES
from .bench_works import WORKS
from .layer_profile import LayerProfile, relative_times, times

CSV_FIELDS = ("mode", "model", "device", "precision", "hint", "streams", "work", "batch",
              "concurrency", "requests", "seconds", "throughput", "p50_ms", "p90_ms", "p95_ms",
              "p99_ms", "mean_ms", "stable", "windows", "errors", "reference_fps",
              "reference_p50_ms", "throughput_ratio", "p50_ratio")
PLOTS = ("throughput.png", "latency.png", "split.png")
LAYER_CSV_FIELDS = ("model", "device", "precision", "hint", "streams", "batch", "layer_type",
                    "kernel", "runtime_precision", "count", "total_us", "share")
LAYER_TYPES_SHOWN = 6  # the rest of a profile's layer types are summed as "other"


def write_all(result: BenchResult, out: Path) -> dict[str, Path | str]:
    """JSON, CSV, summary and plots into `out`; returns what was written (or why a plot was
    not)."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | str] = {}
    summary = summary_text(result)
    atomic_file.write_text(out / "summary.txt", summary + "\n")
    written["summary"] = out / "summary.txt"
    data = result.as_dict()
    data["summary"] = summary
    atomic_file.write_text(out / "bench.json", json_values.dumps(data, indent=2) + "\n")
    written["json"] = out / "bench.json"
    write_csv(result.points, out / "bench.csv")
    written["csv"] = out / "bench.csv"
    if result.layers:
        write_layer_csv(result.layers, out / "layers.csv")
        written["layers_csv"] = out / "layers.csv"
    try:
        written.update(write_plots(result, out))
    except ImportError:
        written["plots"] = "skipped: matplotlib is missing; pip install 'xaiserve[bench]'"
    return written


def write_csv(points: list[Point], path: Path) -> None:
    stages = [s for s in STAGES if any(s in p.split_ms for p in points)]
    with atomic_file.replacing(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *(f"split_{s}_ms" for s in stages)])
        for p in points:
            row = [getattr(p, name) for name in CSV_FIELDS]
            writer.writerow([_cell(v) for v in row]
                            + [_cell(p.split_ms.get(s, 0.0)) for s in stages])


def write_layer_csv(profiles: list[LayerProfile], path: Path) -> None:
    """One row per (profile, layer type, kernel, precision) group."""
    with atomic_file.replacing(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LAYER_CSV_FIELDS)
        for prof in profiles:
            for g in prof.groups:
                writer.writerow([prof.model, prof.device, prof.precision, prof.hint,
                                 prof.streams, prof.batch, g.layer_type, g.kernel, g.precision,
                                 g.count, _cell(g.total_us), _cell(g.share)])


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else value


# --- the summary -------------------------------------------------------------------------------

def _ratio(value: float | None) -> str:
    return f"{value:5.2f}" if value is not None else "    -"


def split_text(split: dict[str, float]) -> str:
    short = {"decode": "dec", "preprocess": "pre", "queue": "queue", "inference": "infer",
             "explanation": "expl", "encode_maps": "enc", "metrics": "metr", "other": "other",
             "transport": "net"}
    return " ".join(f"{short.get(k, k)} {v:.1f}" for k, v in split.items()
                    if v >= 0.05 or k in ("queue", "transport"))


def summary_text(result: BenchResult) -> str:
    env = result.environment
    lines = [
        f"xaiserve bench: OpenVINO {env.get('openvino', '?').split('-')[0]}, "
        f"{env.get('cpu') or 'CPU ?'} ({env.get('cpus')} cores, INT8 sums "
        f"{env.get('cpu_int8', '?')}), devices "
        f"{','.join(env.get('devices', []))}, load {env.get('load_average_before', 0):.2f}"
        f"->{env.get('load_average_after', 0):.2f}; image: {result.image}",
    ]
    load = max(env.get("load_average_before", 0), env.get("load_average_after", 0))
    if env.get("cpus") and load > env["cpus"]:
        lines.append(f"WARNING: load average {load:.1f} over {env['cpus']} cores: other processes "
                     "competed for the CPU, figures and ratios are noisy")
    unstable = sum(not p.stable for p in result.points)
    if unstable:
        lines.append(f"WARNING: {unstable} of {len(result.points)} points did not settle within "
                     f"the stability band ({100 * result.settings.get('stability', 0):.0f}%): "
                     "longer --window or more --max-windows")
    if result.failed:
        lines.append(f"WARNING: {len(result.failed)} of {len(result.failed) + len(result.points)}"
                     " points failed every request and are left out (their skip lines below)")
    lines += result.skips
    configs = ["(as the server runs)" if p.mode != "in-process" else p.config
               for p in result.points]
    # As wide as the longest name: two IRs or configurations must not read alike.
    width = max([20, *(len(p.model) for p in result.points)])
    cwidth = max([28, *(len(c) for c in configs)])
    head = (f"{'mode':<13} {'model':<{width}} {'config':<{cwidth}} {'work':<13} {'b':>2} {'c':>3} "
            f"{'img/s':>8} {'p50':>7} {'p90':>7} {'p95':>7} {'p99':>7}  {'fps/ba':>6} "
            f"{'p50/ba':>6}  stable")
    lines += [head, "-" * len(head)]
    for p, config in zip(result.points, configs):
        lines.append(
            f"{p.mode:<13} {p.model:<{width}} {config:<{cwidth}} {p.work:<13} {p.batch:>2} "
            f"{p.concurrency:>3} {p.throughput:8.1f} {p.p50_ms:7.2f} {p.p90_ms:7.2f} "
            f"{p.p95_ms:7.2f} {p.p99_ms:7.2f}  {_ratio(p.throughput_ratio):>6} "
            f"{_ratio(p.p50_ratio):>6}  {'yes' if p.stable else 'NO'}"
            + (f"  errors {p.errors}: {p.first_error[:60]}" if p.errors else ""))
        lines.append(f"{'':<13} split ms: {split_text(p.split_ms)}")
    if result.references:
        lines.append("benchmark_app (same IR, same device/precision/hint/streams/batch):")
        for r in result.references:
            lines.append(f"  {Path(r.xml).parent.parent.name}/{Path(r.xml).parent.name} "
                         f"{r.device} {r.precision} {r.hint.lower()} streams={r.requested_streams}"
                         f" b{r.batch}: {r.fps:.1f} img/s, p50 {r.p50_ms:.2f} ms, nireq "
                         f"{r.infer_requests}, streams {r.streams}, {r.seconds} s")
    lines += layers_text(result.layers)
    lines.append("img/s counts images; latencies in ms per request (client side); fps/ba and "
                 "p50/ba: ours / benchmark_app (explain-black: a request is masks + 1 "
                 "inferences at benchmark_app's rate; faithfulness: none, the server decides "
                 "how many inferences its curves take); split: mean ms per stage (net = "
                 "transport).")
    return "\n".join(lines)


def layer_profile_label(prof: LayerProfile) -> str:
    hint = HINT_SHORT.get(prof.hint, prof.hint.lower())
    streams = f" st={prof.streams}" if prof.streams != "auto" else ""
    return f"{prof.model} {prof.device} {prof.precision} {hint}{streams} b{prof.batch}"


def _percentages(shares: dict[str, float], count: int = 4) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in list(shares.items())[:count])


def layers_text(profiles: list[LayerProfile]) -> list[str]:
    """Two lines per profile: where the inference's time goes by layer type and precision, and
    its slowest layers."""
    if not profiles:
        return []
    lines = ["per-layer counters (PERF_COUNT on one request back to back, us per inference; "
             "layers.csv, layers.png):"]
    first_ir: dict[tuple, LayerProfile] = {}
    for prof in profiles:
        lines.append(f"  {layer_profile_label(prof)}: {prof.total_us:.0f} us in "
                     f"{prof.layer_count} layers; {_percentages(prof.by_type, 3)}; computed in "
                     f"{_percentages(prof.by_precision)}")
        lines.append("    slowest: " + ", ".join(
            f"{layer.layer_type} {layer.kernel} {layer.mean_us:.0f}" for layer in prof.slowest[:3]))
        # Each further IR under the same configuration against the first one (INT8 vs f32).
        base = first_ir.setdefault(
            (prof.device, prof.precision, prof.hint, prof.streams, prof.batch), prof)
        if base is not prof:
            ratios = relative_times(prof, base)
            lines.append(f"    time / {base.model}'s: " + ", ".join(
                f"{name} {ratio:.2f}" for name, ratio in list(ratios.items())[:5]))
    return lines


# --- plots -------------------------------------------------------------------------------------

def _series_key(p: Point) -> str:
    config = ("server" if p.mode != "in-process"
              else f"{p.device} {p.precision} {p.hint.lower()}"
              + (f" s{p.streams}" if p.streams != "auto" else ""))
    return f"{p.mode} {p.model} {config} {p.work} b{p.batch}"


def point_labels(points: list[Point]) -> list[str]:
    """The latency and split plots' labels: where and what ran, plus the model, hint and
    streams wherever the points differ in them (two hints must not give two alike bars)."""
    local = [p for p in points if p.mode == "in-process"]
    models_differ = len({p.model for p in points}) > 1
    hints_differ = len({p.hint for p in local}) > 1
    streams_differ = len({p.streams for p in local}) > 1
    labels = []
    for p in points:
        parts = [{"server": "srv", "server-stream": "stream", "server-rest": "rest"}.get(
            p.mode, "")]
        if models_differ:
            parts.append(p.model)
        if p.mode == "in-process":
            parts += [p.device, p.precision]
            if hints_differ:
                parts.append(HINT_SHORT.get(p.hint, p.hint.lower()))
            if streams_differ:
                parts.append(f"st={p.streams}")
        parts.append(f"{p.work} b{p.batch} c{p.concurrency}")
        labels.append(" ".join(part for part in parts if part))
    return labels


def throughput_title(result: BenchResult) -> str:
    return "Throughput against concurrency" + (
        " (dashed: benchmark_app on the same IR)" if result.references else "")


def write_plots(result: BenchResult, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result.points
    files: dict[str, Path] = {}

    # Throughput against concurrency: one panel per work (their scales differ by 100x), one
    # line per series, benchmark_app's limit for that work as dashed levels.
    work_names = list(dict.fromkeys(p.work for p in points))
    fig, axes = plt.subplots(1, len(work_names), figsize=(5.5 * len(work_names), 5.5),
                             squeeze=False)
    masks = int(result.settings.get("masks", 1))
    for ax, work in zip(axes[0], work_names):
        series: dict[str, list[Point]] = {}
        for p in points:
            if p.work == work:
                series.setdefault(_series_key(p), []).append(p)
        for key, ps in series.items():
            ps = sorted(ps, key=lambda p: p.concurrency)
            ax.plot([p.concurrency for p in ps], [p.throughput for p in ps], marker="o",
                    label=key.replace(f" {work}", ""))
        per_image = WORKS[work].inferences(1, masks)
        for r in result.references if per_image is not None else ():
            if per_image > 1 and r.batch != 1:
                continue
            level = r.fps / per_image
            ax.axhline(level, linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"benchmark_app {r.device} {r.precision} b{r.batch}", (0.01, level),
                        xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        va="bottom")
        ax.set_xlabel("concurrency (clients)")
        ax.set_ylabel("throughput (images/s)")
        ax.set_title(work)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.suptitle(throughput_title(result))
    files["throughput"] = _save(fig, out / PLOTS[0])

    # Latency percentiles per point.
    labels = point_labels(points)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(points) + 3), 5.5))
    width = 0.2
    for i, (name, attr) in enumerate((("p50", "p50_ms"), ("p90", "p90_ms"), ("p95", "p95_ms"),
                                      ("p99", "p99_ms"))):
        ax.bar([x + (i - 1.5) * width for x in range(len(points))],
               [getattr(p, attr) for p in points], width, label=name)
    ax.set_xticks(range(len(points)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("latency per request (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency percentiles")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    files["latency"] = _save(fig, out / PLOTS[1])

    # The split of a request: each stage's share of the mean latency, with the mean in ms.
    stages = [s for s in STAGES if any(s in p.split_ms for p in points)]
    fig, ax = plt.subplots(figsize=(10, max(4, 0.35 * len(points) + 1.5)))
    left = [0.0] * len(points)
    totals = [sum(p.split_ms.values()) or 1.0 for p in points]
    for stage in stages:
        values = [100 * p.split_ms.get(stage, 0.0) / t for p, t in zip(points, totals)]
        ax.barh(range(len(points)), values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values)]
    for i, total in enumerate(totals):
        ax.annotate(f"{total:.1f} ms", (101, i), va="center", fontsize=7,
                    annotation_clip=False)
    ax.set_yticks(range(len(points)), labels, fontsize=7)
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("share of the mean request time (%); mean ms on the right")
    ax.set_title("Where a request's time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(stages))
    files["split"] = _save(fig, out / PLOTS[2])
    if result.layers:
        files["layers"] = plot_layers(result.layers, out / "layers.png")
    return files


def plot_layers(profiles: list[LayerProfile], path: Path) -> Path:
    """Two panels of stacked bars, one bar per profile: its per-inference layer time by layer
    type, and by the precision the layers ran in."""
    import matplotlib.pyplot as plt

    labels = [layer_profile_label(p) for p in profiles]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.45 * len(profiles) + 2.5)),
                             sharey=True)
    for ax, key, title in ((axes[0], "by_type", "by layer type"),
                           (axes[1], "by_precision", "by the precision a layer ran in")):
        per_profile = [times(prof, key) for prof in profiles]
        totals: dict[str, float] = {}
        for parts in per_profile:
            for name, us in parts.items():
                totals[name] = totals.get(name, 0.0) + us
        shown = sorted(totals, key=lambda n: -totals[n])[:LAYER_TYPES_SHOWN]
        left = [0.0] * len(profiles)
        for name in shown + ["other"]:
            values = [sum(us for n, us in parts.items() if n not in shown) if name == "other"
                      else parts.get(name, 0.0) for parts in per_profile]
            if name == "other" and not any(values):
                continue
            ax.barh(range(len(profiles)), values, left=left, label=name)
            left = [a + b for a, b in zip(left, values)]
        for i, prof in enumerate(profiles):
            ax.annotate(f"{prof.total_us:.0f} us", (left[i], i), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_xlabel("us per inference (summed layer times)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    axes[0].set_yticks(range(len(profiles)), labels, fontsize=7)
    axes[0].invert_yaxis()  # the first profile on top; the axis is shared
    fig.suptitle("Where an inference's time goes (OpenVINO per-layer counters)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file.replacing(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path
