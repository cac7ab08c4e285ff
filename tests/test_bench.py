"""`xaiserve bench` on the real default model: in-process with benchmark_app beside it, through a
real server on a free port, skip lines, bad options. Short windows; timings are never asserted,
only that the figures are there, consistent and honestly labelled."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from tests.conftest import ROOT, run_cli
from xaiserve.service.bench import BenchResult, Point, attach_reference
from xaiserve.service.bench_load import Sample, Window, is_stable, request_split
from xaiserve.service.bench_reference import ReferenceRun, parse_benchmark_app
from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.cpu_int8 import cpu_flags, int8_dot_product
from xaiserve.service.bench_report import layers_text
from xaiserve.service.layer_profile import (LayerTime, group_layers, kernel_precision, profile,
                                            relative_times, shares)
from xaiserve.service.model import compiled_precision
from xaiserve.service.server import Server

SHORT = ("--warmup", "0.3", "--window", "0.5", "--max-windows", "4")
PERCENTILES = ("p50_ms", "p90_ms", "p95_ms", "p99_ms")


def _load(out):
    data = json.loads((out / "bench.json").read_text())
    with (out / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    return data, rows


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xaiserve bench: error: ")
    return lines[0]


def test_in_process_writes_json_csv_plots_and_summary(default_export, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "--model-path", str(default_export.path.parent), "--works",
                   "predict,explain-white", "--batch", "1,2", "--concurrency", "1,2",
                   "--reference-seconds", "1", *SHORT, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data, rows = _load(out)
    points = data["points"]
    assert {(p["work"], p["batch"], p["concurrency"]) for p in points} == {
        (w, b, c) for w in ("predict", "explain-white") for b in (1, 2) for c in (1, 2)}
    for p in points:
        assert p["mode"] == "in-process" and p["model"] == "efficientnet_lite0/1"
        assert p["device"] == "CPU" and p["hint"] == "THROUGHPUT"
        assert p["requests"] >= 1 and p["throughput"] > 0 and p["errors"] == 0
        values = [p[k] for k in PERCENTILES]
        assert values == sorted(values) and values[0] > 0
        assert isinstance(p["stable"], bool) and 1 <= p["windows"] <= 4
        # The split covers the request: its stages add up to the mean latency.
        assert {"queue", "inference", "other"} <= set(p["split_ms"])
        assert sum(p["split_ms"].values()) == pytest.approx(p["mean_ms"], rel=1e-6)
        # Each point carries benchmark_app on the same IR and batch, and the ratios.
        assert p["reference_fps"] > 0
        assert p["throughput_ratio"] == pytest.approx(p["throughput"] / p["reference_fps"])
        assert p["p50_ratio"] == pytest.approx(p["p50_ms"] / p["reference_p50_ms"])
    white = [p for p in points if p["work"] == "explain-white"]
    assert all({"decode", "preprocess", "explanation"} <= set(p["split_ms"]) for p in white)
    refs = data["references"]
    assert sorted(r["batch"] for r in refs) == [1, 2]
    assert all(r["hint"] == "THROUGHPUT" and r["fps"] > 0 and r["p50_ms"] > 0 for r in refs)
    assert len(rows) == len(points)
    assert float(rows[0]["p50_ms"]) == pytest.approx(points[0]["p50_ms"], abs=1e-3)
    assert "split_inference_ms" in rows[0] and "split_queue_ms" in rows[0]
    for name in ("throughput.png", "latency.png", "split.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = proc.stdout
    assert summary == (out / "summary.txt").read_text()
    assert "benchmark_app" in summary and "fps/ba" in summary
    assert len(summary.splitlines()) <= 2 * len(points) + 12  # one screen
    # whether this CPU's INT8 sums saturate: it changes what an INT8 IR computes here
    int8_sums = int8_dot_product(cpu_flags())
    assert data["environment"]["cpu_int8"] == int8_sums
    assert f"INT8 sums {int8_sums}" in summary.splitlines()[0]


def test_layer_counters_say_where_the_inference_goes_and_in_which_precision(default_export,
                                                                             tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "--model-path", str(default_export.path), "--works", "predict",
                   "--precision", "default,f32", "--hint", "LATENCY", "--batch", "1,2",
                   "--layers", "--layer-iterations", "10", "--no-reference", *SHORT,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data, _ = _load(out)
    profiles = data["layers"]
    assert [(p["precision"], p["batch"]) for p in profiles] == [
        ("default", 1), ("default", 2), ("f32", 1), ("f32", 2)]
    # What a server compiles the IR in by default here: bf16 on AMX CPUs, f32 elsewhere.
    default = compiled_precision(ov.Core().compile_model(default_export.path / "model.xml",
                                                         "CPU"))
    for p in profiles:
        assert p["model"] == "efficientnet_lite0/1" and p["hint"] == "LATENCY"
        groups = p["groups"]
        assert sum(g["count"] for g in groups) == p["layer_count"] > 20
        assert sum(g["total_us"] for g in groups) == pytest.approx(p["total_us"], rel=1e-6)
        for parts in (p["by_type"], p["by_precision"], {i: g["share"] for i, g in
                                                        enumerate(groups)}):
            assert sum(parts.values()) == pytest.approx(1.0, abs=1e-6)
        assert p["by_type"]["Convolution"] > 0.3  # a CNN's time goes to its convolutions
        slowest = [t["mean_us"] for t in p["slowest"]]
        assert 1 <= len(slowest) <= 10 and slowest == sorted(slowest, reverse=True)
        assert len(p["layers"]) == p["layer_count"]  # every layer, for a closer look
        assert max(t["mean_us"] for t in p["layers"]) == slowest[0]
        # The counters say which precision the layers ran in: what the configuration asks.
        expected = "f32" if p["precision"] == "f32" else default
        assert p["by_precision"][expected] > 0.5, p["by_precision"]
        if p["precision"] == "f32":
            assert "bf16" not in p["by_precision"] and "f16" not in p["by_precision"]
    with (out / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(p["groups"]) for p in profiles)
    assert {r["runtime_precision"] for r in rows} >= {"f32", default}
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = proc.stdout
    assert "per-layer counters" in summary
    assert f"efficientnet_lite0/1 CPU f32 lat b2: {profiles[3]['total_us']:.0f} us in " in summary
    assert f"computed in {default} " in summary


@pytest.fixture(scope="module")
def server(default_export):
    # two open streams at most: the bench's --stream clients must close theirs after each
    # point, or the next point's would be refused
    settings = ServerSettings(repository=default_export.path.parent.parent, host="127.0.0.1",
                              port=0, rest_port=0, poll_seconds=0.5, max_open_streams=2,
                              defaults=ModelSettings(black_box_masks=50, max_black_box_masks=200))
    srv = Server(settings).start()
    yield srv
    srv.stop(grace=2)


def server_url(server, protocol: str) -> str:
    """What `--server` takes: HOST:PORT for gRPC, http://HOST:PORT for the REST side."""
    return (f"127.0.0.1:{server.port}" if protocol.startswith("grpc")
            else f"http://127.0.0.1:{server.rest.port}")


@pytest.mark.parametrize("protocol, mode", [("grpc", "server"), ("grpc-stream", "server-stream"),
                                            ("http", "server-rest")])
def test_server_mode_gives_the_split_with_queue_and_transport(server, protocol, mode, tmp_path):
    out = tmp_path / "bench"
    stream = ["--streaming"] if protocol == "grpc-stream" else []
    proc = run_cli("bench", "--server", server_url(server, protocol), *stream, "--model",
                   "efficientnet_lite0", "--works",
                   "predict,explain-white,explain-black,faithfulness", "--masks", "40",
                   "--batch", "1,2", "--concurrency", "1,2", "--no-reference", *SHORT,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data, _ = _load(out)
    points = data["points"]
    done = {(p["work"], p["batch"]) for p in points}
    assert done == {("predict", 1), ("predict", 2), ("explain-white", 1), ("explain-black", 1),
                    ("faithfulness", 1)}
    for p in points:
        assert p["mode"] == mode and p["model"] == "efficientnet_lite0/1"
        assert p["errors"] == 0, p["first_error"]
        split = p["split_ms"]
        assert {"queue", "inference", "transport"} <= set(split), split
        assert split["transport"] > 0 and split["inference"] > 0 and split["queue"] >= 0
        assert sum(split.values()) == pytest.approx(p["mean_ms"], rel=1e-6)
        values = [p[k] for k in PERCENTILES]
        assert values == sorted(values)
        assert p["reference_fps"] is None  # --no-reference
    by_work = {p["work"]: p for p in points if p["batch"] == 1}
    assert {"decode", "preprocess", "explanation", "encode_maps", "metrics"} <= set(
        by_work["explain-white"]["split_ms"])
    # The faithfulness work makes the server run its deletion/insertion curves (hundreds of
    # inferences), so its metrics stage dwarfs the plain explain's.
    assert by_work["faithfulness"]["split_ms"]["metrics"] > \
        20 * by_work["explain-white"]["split_ms"]["metrics"]
    skips = data["skips"]
    assert "skip explain-white server batch 2: an Explain request takes one image " \
           "(use --batch 1)" in skips
    assert all(line in proc.stdout for line in skips)
    assert f"{mode:<13} efficientnet_lite0/1" in proc.stdout  # the summary's rows



def test_absent_device_and_precision_give_skip_lines(default_export, tmp_path):
    core = ov.Core()
    absent = next(d for d in ("NPU", "GPU", "GPU.7") if d not in core.available_devices)
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out = tmp_path / "bench"
    proc = run_cli("bench", "--model-path", str(default_export.path), "--works", "predict",
                   "--device", f"{absent},CPU", "--precision", "f32,bf16", "--no-reference",
                   *SHORT, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data, _ = _load(out)
    assert f"skip {absent}: not present (available: {', '.join(core.available_devices)})" \
        in proc.stdout
    assert any(p["device"] == "CPU" and p["precision"] == "f32" for p in data["points"])
    assert not any(p["device"] == absent for p in data["points"])
    if "BF16" not in capabilities:
        assert any(line.startswith("skip CPU bf16: the device has no BF16")
                   for line in data["skips"])
        assert {p["precision"] for p in data["points"]} == {"f32"}


@pytest.mark.parametrize("args, words", [
    ((), "--model-path"),
    (("--server", "127.0.0.1:1"), "--model NAME"),
    (("--model-path", "MODEL", "--concurrency", "0"), "--concurrency"),
    (("--model-path", "MODEL", "--batch", "one"), "--batch"),
    (("--model-path", "MODEL", "--works", "predict,nope"), "--works nope"),
    (("--model-path", "MODEL", "--precision", "f8"), "--precision f8"),
    (("--model-path", "MODEL", "--stability", "0"), "--stability"),
    # a range error says the rule, which --help does not list
    (("--model-path", "MODEL", "--max-windows", "1"),
     "--max-windows 1: give at least --stable-windows (3)"),
    (("--model-path", "MODEL", "--stable-windows", "1"), "--stable-windows 1: give at least 2"),
    (("--model-path", "/nonexistent/model"), "/nonexistent/model"),
    (("--model-path", "MODEL", "--image", __file__), "not a decodable image"),
    (("--server", "127.0.0.1:1", "--model", "m", "--warmup", "0"), "not reachable"),
    (("--server", "127.0.0.1:1", "--model", "m", "--layers"), "--layers"),
    (("--server", "http://127.0.0.1:1", "--model", "m", "--warmup", "0"), "not reachable"),
    (("--server", "ftp://127.0.0.1:1", "--model", "m"), "http[s]://HOST:PORT"),
    (("--server", "https://127.0.0.1:1", "--model", "m", "--warmup", "0"), "not reachable"),
    (("--server", "http://127.0.0.1:1", "--model", "m", "--tls-ca", "ROOTS"),
     "give https://127.0.0.1:1"),
    (("--server", "127.0.0.1:1", "--model", "m", "--tls-ca", "/nonexistent.pem"), "--tls-ca"),
    (("--model-path", "MODEL", "--layers", "--layer-iterations", "0"), "--layer-iterations"),
    (("--model-path", "MODEL", "--streaming"), "--streaming sends each client's requests"),
    (("--server", "http://127.0.0.1:1", "--model", "m", "--streaming"),
     "the REST side has no streams"),
])
def test_bad_options_give_one_line_and_exit_2(default_export, args, words):
    import grpc

    roots = Path(grpc.__file__).parent / "_cython" / "_credentials" / "roots.pem"  # real PEM
    args = tuple({"MODEL": str(default_export.path), "ROOTS": str(roots)}.get(a, a)
                 for a in args)
    assert words in _error_line(run_cli("bench", *args))


@pytest.mark.parametrize("protocol, words", [("grpc", "NOT_FOUND"),
                                             ("http", "model_name 'nope' is not served")])
def test_unknown_model_on_server_is_one_line(server, protocol, words):
    line = _error_line(run_cli("bench", "--server", server_url(server, protocol), "--model",
                               "nope"))
    assert f"--model nope: {words}" in line


def test_layer_times_grouped_by_type_kernel_and_precision():
    layers = [LayerTime("a", "Convolution", "brgconv_1x1_bf16", "bf16", 30.0),
              LayerTime("b", "Reorder", "jit_uni_f32", "f32", 10.0),
              LayerTime("c", "Convolution", "brgconv_1x1_bf16", "bf16", 10.0)]
    groups = group_layers(layers)
    assert [(g.layer_type, g.count, g.total_us) for g in groups] == [("Convolution", 2, 40.0),
                                                                    ("Reorder", 1, 10.0)]
    assert [g.share for g in groups] == pytest.approx([0.8, 0.2])
    assert shares(layers, "precision") == pytest.approx({"bf16": 0.8, "f32": 0.2})
    assert list(shares(layers, "layer_type")) == ["Convolution", "Reorder"]  # largest first
    assert kernel_precision("brgconv_avx512_amx_1x1_bf16") == "bf16"
    assert group_layers([]) == [] and shares([], "precision") == {}


@pytest.mark.parametrize("start, requests", [
    ("Start inference asynchronously, 4 inference requests, limits: 2000 ms duration", 4),
    ("Start inference synchronously, limits: 2000 ms duration", 1),  # the LATENCY hint
])
def test_benchmark_app_report_gives_its_infer_requests(start, requests):
    report = (f"[Step 10/11] Measuring performance ({start})\n[ INFO ]   NUM_STREAMS: 1\n"
              "[ INFO ] Count:            835 iterations\n"
              "[ INFO ] Duration:         2001.92 ms\n[ INFO ] Latency:\n"
              "[ INFO ]    Median:        2.31 ms\n[ INFO ]    Average:       2.32 ms\n"
              "[ INFO ] Throughput:   417.10 FPS\n")
    values = parse_benchmark_app(report)
    assert (values["infer_requests"], values["streams"]) == (requests, 1)
    assert (values["iterations"], values["p50_ms"], values["fps"]) == (835, 2.31, 417.10)


def test_a_second_ir_under_the_same_configuration_is_compared_with_the_first():
    def prof(model, batch, conv_us, reorder_us):
        layers = [LayerTime("c", "Convolution", "k", "u8", conv_us),
                  LayerTime("r", "Reorder", "r", "f32", reorder_us)]
        return profile(layers, model=model, device="CPU", precision="default", hint="LATENCY",
                       streams="auto", batch=batch, iterations=10)

    f32, int8 = prof("f32/1", 1, 80.0, 20.0), prof("int8/1", 1, 40.0, 20.0)
    assert relative_times(int8, f32) == pytest.approx(
        {"total": 0.6, "Convolution": 0.5, "Reorder": 1.0})
    lines = layers_text([f32, int8, prof("int8/1", 8, 400.0, 100.0)])
    assert [ln.strip() for ln in lines if "time / " in ln] == [
        "time / f32/1's: total 0.60, Convolution 0.50, Reorder 1.00"]  # not across batches


def test_stability_rule_and_split():
    def windows(*pairs):
        return [Window(1.0, 10, fps, p50) for fps, p50 in pairs]

    assert is_stable(windows((100, 10), (105, 10.5), (96, 9.7)), 0.10, 3)
    assert not is_stable(windows((100, 10), (105, 10.5)), 0.10, 3)  # too few
    assert not is_stable(windows((100, 10), (130, 10), (100, 10)), 0.10, 3)  # throughput
    assert not is_stable(windows((100, 10), (100, 13), (100, 10)), 0.10, 3)  # p50
    assert is_stable(windows((50, 99), (100, 10), (100, 10.2), (99, 10)), 0.10, 3)  # last 3

    remote = request_split([Sample(0, 10.0, {"queue": 1.0, "inference": 5.0, "total": 7.0}),
                            Sample(0, 12.0, {"queue": 0.0, "inference": 6.0, "total": 8.0})],
                           remote=True)
    assert remote == pytest.approx({"queue": 0.5, "inference": 5.5, "other": 1.5,
                                    "transport": 3.5})
    assert list(remote) == ["queue", "inference", "other", "transport"]
    local = request_split([Sample(0, 10.0, {"queue": 1.0, "inference": 5.0})], remote=False)
    assert local == pytest.approx({"queue": 1.0, "inference": 5.0, "other": 4.0})
    assert np.isclose(sum(local.values()), 10.0)


def test_ratios_to_benchmark_app_count_the_inferences_of_a_request():
    ref = ReferenceRun("m.xml", "CPU", "throughput", 1, 10, fps=100.0, p50_ms=10.0,
                       mean_ms=10.0, iterations=1000, duration_ms=10000.0, infer_requests=2,
                       streams=2)

    def point(work: str, throughput: float, p50: float) -> Point:
        return Point("server", "m/1", "CPU", "default", "tput", "auto", work, 1, 1, 10, 1.0,
                     throughput, p50, p50, p50, p50, p50, True, 3, 0, {})

    predict, black, faithful = (point("predict", 80.0, 12.5), point("explain-black", 0.5, 500.0),
                                point("faithfulness", 0.4, 2000.0))
    for p in (predict, black, faithful):
        attach_reference(p, ref, masks=99)
    assert predict.throughput_ratio == pytest.approx(0.8)
    assert predict.p50_ratio == pytest.approx(1.25)
    # A RISE request with 99 masks is 100 inferences: its limit is 1 request/s, 1000 ms.
    assert black.throughput_ratio == pytest.approx(0.5)
    assert black.p50_ratio == pytest.approx(0.5)
    # The server decides how many inferences the faithfulness curves take: no ratio at all.
    assert faithful.throughput_ratio is None and faithful.p50_ratio is None


@pytest.mark.parametrize("how", ["env", "file"])
def test_the_token_is_never_written(default_export, tmp_path, how):
    """bench.json used to keep the bearer token in plain text (settings.access.token): a file
    that is shared and archived. It says only that a token was given, and from which file."""
    token = "supersecret-token-123"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    out = tmp_path / "bench"
    args = ("bench", "--model-path", str(default_export.path), "--works", "predict",
            "--no-reference", "--warmup", "0.2", "--window", "0.3", "--max-windows", "2",
            "--stable-windows", "2", "--out", str(out))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if how == "env":
        env["XAISERVE_TOKEN"] = token
    else:
        env.pop("XAISERVE_TOKEN", None)
        args += ("--token-file", str(token_file))
    proc = subprocess.run([sys.executable, "-m", "xaiserve.service.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr
    written = sorted(out.iterdir())
    assert {f.name for f in written} >= {"bench.json", "bench.csv", "summary.txt"}
    for f in written:
        assert token.encode() not in f.read_bytes(), f.name
    access = json.loads((out / "bench.json").read_text())["settings"]["access"]
    assert access["token_given"] is True and "token" not in access
    assert access["token_file"] == (str(token_file) if how == "file" else None)


def test_a_point_whose_requests_all_fail_is_skipped_and_the_rest_kept(server, tmp_path):
    """One work the server refuses (more masks than its cap) used to end the run with no file
    at all, losing the points measured before it."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "--server", server_url(server, "grpc"), "--model",
                   "efficientnet_lite0", "--works", "explain-black,predict", "--masks", "1000",
                   "--no-reference", *SHORT, "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    data, rows = _load(out)
    assert [(p["work"], p["errors"]) for p in data["points"]] == [("predict", 0)]
    assert len(rows) == 1
    line = ("skip server efficientnet_lite0/1 explain-black b1 c1: every request failed: "
            "RESOURCE_EXHAUSTED: ")
    assert [f[:len(line)] for f in data["failed"]] == [line]
    assert data["failed"][0] in data["skips"] and data["failed"][0] in proc.stdout
    assert "WARNING: 1 of 2 points failed every request" in proc.stdout
    for name in ("throughput.png", "latency.png", "split.png"):
        assert (out / name).is_file()
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "xaiserve bench: 1 of 2 points failed every request")
    # Nothing measured at all: exit 2, the last line says why.
    proc = run_cli("bench", "--server", server_url(server, "grpc"), "--model",
                   "efficientnet_lite0", "--works", "explain-black", "--masks", "1000",
                   "--no-reference", *SHORT, "--out", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "xaiserve bench: error: nothing was measured: ")


def test_version_picks_the_version_in_process_and_on_the_server(default_export, server,
                                                                 tmp_path):
    """--version used to be ignored in-process (the newest version was measured, silently)."""
    line = _error_line(run_cli("bench", "--model-path", str(default_export.path.parent),
                               "--version", "2", "--works", "predict", "--no-reference",
                               *SHORT, "--out", str(tmp_path / "missing")))
    assert "--version 2:" in line and "has versions 1" in line
    for where, args in (("local", ["--model-path", str(default_export.path.parent)]),
                        ("remote", ["--server", server_url(server, "grpc"), "--model",
                                    "efficientnet_lite0"])):
        proc = run_cli("bench", *args, "--version", "1", "--works", "predict",
                       "--no-reference", *SHORT, "--out", str(tmp_path / where))
        assert proc.returncode == 0, proc.stderr
        assert [p["model"] for p in _load(tmp_path / where)[0]["points"]] == [
            "efficientnet_lite0/1"], where


def test_a_server_killed_mid_run_ends_the_point_and_keeps_the_points_before(default_export,
                                                                           tmp_path):
    """A server that died after a point's first answers used to hang the bench for ever (its
    clients retried every 50 ms and the window never filled). Now the point is given up after
    10 s without an answer, and what was measured before is written."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log, bench_stdout = (tmp_path / "serve.log").open("w"), (tmp_path / "stdout").open("w")
    serve = subprocess.Popen(  # its request lines go to the log file: a pipe would fill
        [sys.executable, "-m", "xaiserve.service.cli", "serve", "--repository",
         str(default_export.path.parent.parent), "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
    bench = None
    try:
        deadline = time.monotonic() + 120
        line = serve.stdout.readline()
        assert "serving" in line, (tmp_path / "serve.log").read_text()
        port = int(line.rsplit("on port ", 1)[1])
        out = tmp_path / "bench"
        # Exactly 4 windows of 1 s per point: the kill lands inside the second point.
        bench = subprocess.Popen(
            [sys.executable, "-m", "xaiserve.service.cli", "bench", "--server",
             f"127.0.0.1:{port}", "--model", "efficientnet_lite0", "--works", "predict",
             "--concurrency", "1,2", "--warmup", "0.2", "--window", "1", "--stable-windows",
             "4", "--max-windows", "4", "--no-reference", "--out", str(out)],
            stdout=bench_stdout, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        stderr: list[bytes] = []

        def read_stderr() -> None:  # the progress bar, as it is drawn
            while chunk := os.read(bench.stderr.fileno(), 4096):
                stderr.append(chunk)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()

        def second_point_answered() -> bool:
            text = b"".join(stderr).decode(errors="replace")
            return "window 1:" in text.partition("server predict b1 c2")[2]

        while not second_point_answered():
            assert bench.poll() is None and time.monotonic() < deadline, b"".join(stderr)
            time.sleep(0.02)
        serve.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            bench.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("bench still running 90 s after the server was killed")
        reader.join(timeout=10)
        stdout = (tmp_path / "stdout").read_text()
        assert time.monotonic() - killed < 40
        errors = b"".join(stderr).decode(errors="replace")
        assert bench.returncode == 1, errors[-2000:]
        data, rows = _load(out)
        assert [(p["concurrency"], p["windows"]) for p in data["points"]] == [(1, 4)]
        assert len(rows) == 1
        line = "skip server efficientnet_lite0/1 predict b1 c2: every request failed for 10 s " \
               "after "
        assert len(data["failed"]) == 1 and data["failed"][0].startswith(line), data["failed"]
        assert "UNAVAILABLE" in data["failed"][0] and data["failed"][0] in stdout
        assert errors.strip().splitlines()[-1].startswith(
            "xaiserve bench: 1 of 2 points failed every request")
    finally:
        for process in (bench, serve):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        log.close()
        bench_stdout.close()


def test_plot_labels_tell_configurations_apart():
    """Two hints (or two IRs) used to give two bars both labelled 'CPU default predict b1 c1'."""
    from xaiserve.service.bench_report import point_labels, summary_text, throughput_title

    def point(model: str, hint: str, streams: str = "auto", mode: str = "in-process") -> Point:
        return Point(mode, model, "CPU", "default", hint, streams, "predict", 1, 1, 10, 1.0,
                     100.0, 5.0, 5.0, 5.0, 5.0, 5.0, True, 3, 0, {"inference": 5.0})

    assert point_labels([point("m/1", "LATENCY")]) == ["CPU default predict b1 c1"]
    assert point_labels([point("m/1", "LATENCY"), point("m/1", "THROUGHPUT")]) == [
        "CPU default lat predict b1 c1", "CPU default tput predict b1 c1"]
    assert point_labels([point("m/1", "LATENCY", "1"), point("m/1", "LATENCY", "2"),
                         point("m/1", "server", "server", "server")]) == [
        "CPU default st=1 predict b1 c1", "CPU default st=2 predict b1 c1",
        "srv predict b1 c1"]
    long_names = [point("efficientnet_lite0_int8_keep_f32/1", "LATENCY"),
                  point("efficientnet_lite0_int8_plain/1", "LATENCY")]
    labels = point_labels(long_names)
    assert labels[0].startswith("efficientnet_lite0_int8_keep_f32/1") and len(set(labels)) == 2
    result = BenchResult({}, {}, "photo", points=long_names)
    summary = summary_text(result)
    assert all(p.model in summary for p in long_names)  # not cut to 20 characters
    assert "benchmark_app" not in throughput_title(result)  # --no-reference: no dashed lines
