"""Operations against a real server on real ports: Prometheus metrics scraped over HTTP and
parsed with Prometheus' own text parser, JSON logs carrying the request id, graceful shutdown
of the `xaiserve serve` process on SIGTERM with requests in flight, and versions added and
removed while clients send requests without pause."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from xaiserve.service import logs
from xaiserve.service.client import XaiClient
from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.health import HealthError, check_health
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc
from xaiserve.service.layout import version_dirs
from xaiserve.service.repository import plan_versions
from xaiserve.service.rest_client import RestClient, RestError
from xaiserve.service.server import Server

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]

IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def infer_request(version: str = "", request_id: str = "") -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="shapes", model_version=version, id=request_id)
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 64, 64, 3])
    request.raw_input_contents.append(IMAGE.tobytes())
    return request


def explain_request(method=xpb.METHOD_AUTO, masks: int = 0, seed: int = 0,
                    request_id: str = "") -> xpb.ExplainRequest:
    return xpb.ExplainRequest(
        model_name="shapes", id=request_id, method=method, map_format=xpb.MAP_FORMAT_FLOAT,
        image=xpb.Image(tensor=xpb.Tensor(shape=[64, 64, 3], data=IMAGE.tobytes())),
        black_box=xpb.BlackBoxOptions(num_masks=masks, seed=seed))


def scrape(port: int) -> dict[str, dict]:
    """{family name: {(sample name, sorted labels): value}} from the /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                                 for s in family.samples}
    return families


def sample(families, family: str, name: str, **labels) -> float:
    return families[family][(name, tuple(sorted(labels.items())))]


def calls_counted(port: int) -> float:
    """All calls in xaiserve_requests_total, whatever their labels."""
    return sum(value for (name, _), value in scrape(port).get("xaiserve_requests", {}).items()
               if name == "xaiserve_requests_total")


def wait_until(condition, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def served(small_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("ops")
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0, metrics_port=0,
                              poll_seconds=0.2, max_concurrent_requests=16,
                              defaults=ModelSettings(black_box_masks=100,
                                                     max_black_box_masks=20_000))
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, repo, channel
    channel.close()
    server.stop(grace=2)


def test_metrics_scraped_over_http(served):
    server, _, channel = served
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    explain = xgrpc.ExplanationServiceStub(channel)
    inference_ms = [kserve.ModelInfer(infer_request()).parameters["inference_ms"].double_param
                    for _ in range(3)]
    inference_ms += [explain.Explain(request).timings_ms["inference"] for request in (
        explain_request(xpb.METHOD_WHITE_BOX),
        explain_request(xpb.METHOD_BLACK_BOX, masks=300),
        explain_request(xpb.METHOD_BLACK_BOX, masks=200, seed=1))]
    with pytest.raises(grpc.RpcError):
        kserve.ModelInfer(kpb.ModelInferRequest(model_name="../../etc/passwd"))
    bad = infer_request()
    bad.inputs[0].datatype = "FP32"
    with pytest.raises(grpc.RpcError):
        kserve.ModelInfer(bad)

    requests = "xaiserve_requests"
    # calls are counted just after their responses leave: wait for all 8 of them
    assert wait_until(lambda: calls_counted(server.metrics_port) == 8, 10)
    m = scrape(server.metrics_port)
    assert sample(m, requests, "xaiserve_requests_total", model="shapes", version="1",
                  method="ModelInfer", code="OK", protocol="grpc") == 3
    assert sample(m, requests, "xaiserve_requests_total", model="shapes", version="1",
                  method="Explain", code="OK", protocol="grpc") == 3
    # an unserved name never becomes a label value: only served names do
    assert sample(m, requests, "xaiserve_requests_total", model="", version="",
                  method="ModelInfer", code="NOT_FOUND", protocol="grpc") == 1
    assert sample(m, requests, "xaiserve_requests_total", model="shapes", version="",
                  method="ModelInfer", code="INVALID_ARGUMENT", protocol="grpc") == 1
    assert not any("passwd" in str(key) for key in m[requests])
    # reload counts exist at 0 before any reload: an alert on increase() sees the first failure
    reloads = "xaiserve_config_reloads"
    assert sample(m, reloads, reloads + "_total", result="failed") == 0
    assert sample(m, reloads, reloads + "_total", result="applied") == 0
    # inference: 3 ModelInfer + 3 Explain predictions; explanation: by explainer
    assert sample(m, "xaiserve_inference_seconds", "xaiserve_inference_seconds_count",
                  model="shapes", version="1") == 6
    # the inference each call reported, not the whole call (ModelInfer's decode, queue, reply)
    assert sample(m, "xaiserve_inference_seconds", "xaiserve_inference_seconds_sum",
                  model="shapes", version="1") == pytest.approx(sum(inference_ms) / 1e3)
    assert sample(m, "xaiserve_explanation_seconds", "xaiserve_explanation_seconds_count",
                  model="shapes", version="1", explainer="reciprocam") == 1
    assert sample(m, "xaiserve_explanation_seconds", "xaiserve_explanation_seconds_count",
                  model="shapes", version="1", explainer="rise") == 2
    assert sample(m, "xaiserve_explanation_seconds", "xaiserve_explanation_seconds_bucket",
                  model="shapes", version="1", explainer="rise", le="+Inf") == 2
    passes = "xaiserve_black_box_forward_passes"
    assert sample(m, passes, passes + "_count", model="shapes", version="1") == 2
    assert sample(m, passes, passes + "_sum", model="shapes", version="1") == 500
    assert sample(m, passes, passes + "_bucket", model="shapes", version="1", le="250.0") == 1
    assert sample(m, "xaiserve_request_seconds", "xaiserve_request_seconds_count",
                  method="ModelInfer") == 5
    assert sample(m, "xaiserve_requests_in_flight", "xaiserve_requests_in_flight") == 0
    # the process, and what runs: memory grows with every compiled copy, so it must be seen
    import openvino

    from xaiserve.service import __version__
    assert sample(m, "process_resident_memory_bytes", "process_resident_memory_bytes") > 50e6
    assert sample(m, "process_open_fds", "process_open_fds") > 0
    assert sample(m, "xaiserve_build_info", "xaiserve_build_info", version=__version__,
                  openvino=openvino.get_version()) == 1


def test_a_model_cap_leaves_slots_to_the_other_models(small_export, tmp_path):
    """Black-box explanations of one model (seconds each) could take every server slot and
    leave the other models refused. With the model's `max_requests_in_flight` its share is
    bounded: beyond it its own requests get RESOURCE_EXHAUSTED, the others are answered."""
    for name in ("shapes", "other"):
        shutil.copytree(small_export.path, tmp_path / name / "1")
    capped = ModelSettings(max_requests_in_flight=1, max_black_box_masks=50_000)
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                              max_concurrent_requests=4, models={"shapes": capped})
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    explain = xgrpc.ExplanationServiceStub(channel)
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    try:
        slow = explain.Explain.future(explain_request(xpb.METHOD_BLACK_BOX, masks=50_000),
                                      timeout=120)
        assert wait_until(lambda: server.telemetry.registry.get_sample_value(
            "xaiserve_requests_in_flight") == 1, 10)
        with pytest.raises(grpc.RpcError) as refused:
            kserve.ModelInfer(infer_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model 'shapes' is handling its maximum of 1" in refused.value.details()
        other = infer_request()
        other.model_name = "other"
        assert kserve.ModelInfer(other, timeout=10).model_name == "other"
        assert not slow.done()  # the refusal came while the slow one was in flight
        assert len(slow.result().maps) == 1
        assert kserve.ModelInfer(infer_request(), timeout=10).model_version == "1"  # freed
    finally:
        channel.close()
        server.stop(grace=0)


def test_json_logs_carry_the_request_id(served):
    server, _, channel = served
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("INFO", "json", stream=stream)
    try:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(request_id="req-42"))
        answer = xgrpc.ExplanationServiceStub(channel).Explain(explain_request())
        for request_id, parent in (("traced", TRACEPARENT), ("badly-traced", "00-xyz-01")):
            kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(request_id=request_id), metadata=(("traceparent", parent),))
        with pytest.raises(grpc.RpcError):
            XaiClient(f"127.0.0.1:{server.port}").explain(b"not an image", "shapes")
        # the access log is written just after each response leaves
        assert wait_until(lambda: stream.getvalue().count('"xaiserve.access"') >= 5, 10)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [e for e in lines if e["logger"] == "xaiserve.access"]
    assert {"time", "level", "message", "request_id", "model", "method", "code", "ms"} \
        <= set(access[0])
    first = next(e for e in access if e["request_id"] == "req-42")
    assert (first["model"], first["version"], first["method"], first["code"]) == \
        ("shapes", "1", "ModelInfer", "OK")
    assert first["ms"] > 0
    # no id sent: the server makes one, answers with it and logs it
    assert len(answer.id) == 32
    assert any(e["request_id"] == answer.id and e["method"] == "Explain" for e in access)
    failed = [e for e in access if e["code"] == "INVALID_ARGUMENT"]
    assert failed and failed[0]["model"] == "shapes" and failed[0]["request_id"]
    # a client's W3C trace context joins its traces to these lines; a malformed one is ignored
    traced = next(e for e in access if e["request_id"] == "traced")
    assert (traced["trace_id"], traced["span_id"]) == tuple(TRACEPARENT.split("-")[1:3])
    untraced = next(e for e in access if e["request_id"] == "badly-traced")
    assert "trace_id" not in untraced and "trace_id" not in first


def test_lines_logged_inside_a_request_carry_all_its_fields():
    """A warning logged deep in a handler (which knows nothing of the request) still says
    which request, model, caller's token and protocol it came from."""
    from xaiserve.service import request_context

    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("INFO", "json", stream=stream)
    record = request_context.RequestRecord(
        method="Explain", request_id="r-7", model="shapes", version="2", trace_id="t" * 32,
        span_id="s" * 16, token_id="ci-token", protocol="http")
    token = request_context.enter(record)
    try:
        logging.getLogger("xaiserve.somewhere").warning("deep inside")
    finally:
        request_context.leave(token)
        root.handlers[:], level = saved
        root.setLevel(level)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["message"] == "deep inside"
    for field in dataclasses.fields(request_context.RequestRecord):
        if field.name in logs.REQUEST_FIELDS:
            assert line[field.name] == getattr(record, field.name), field.name
    assert {"token_id", "protocol"} <= set(line)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, expected", [
    (TRACEPARENT, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later",  # a later version's
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more", ("", "")),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ("", "")),  # zero trace id
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", ("", "")),  # upper case
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ("", "")),
    ("00-4bf92f35-00f067aa0ba902b7-01", ("", "")),
])
def test_trace_context_follows_the_w3c_rules(value, expected):
    from xaiserve.service.request_context import trace_context

    assert trace_context([("other", "x"), ("traceparent", value)]) == expected


# --- hot reload under load --------------------------------------------------------------------

def add_version(repo: Path, source: Path, version: int) -> None:
    """As the exporter does: write into a hidden directory, then rename into place."""
    staging = repo / "shapes" / f".staging-{version}"
    shutil.copytree(source, staging)
    os.rename(staging, repo / "shapes" / str(version))


def remove_version(repo: Path, version: int) -> None:
    hidden = repo / "shapes" / f".removed-{version}"
    os.rename(repo / "shapes" / str(version), hidden)
    shutil.rmtree(hidden)


def served_at(history, version: int, sent: float, answered: float) -> bool:
    """Was `version` loaded at some instant between sending and answering?"""
    ready = [t for t, _, v, what in history if v == version and what == "ready"]
    gone = [t for t, _, v, what in history if v == version and what == "unloaded"]
    return bool(ready) and min(ready) <= answered and (not gone or max(gone) >= sent)


def test_versions_added_and_removed_under_load(served, small_export):
    server, repo, channel = served
    add_version(repo, small_export.path, 2)
    assert wait_until(lambda: any(v == 2 for _, _, v, w in server.repository.history
                                  if w == "ready"))
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    explain = xgrpc.ExplanationServiceStub(channel)
    calls = [lambda: kserve.ModelInfer(infer_request(), timeout=30),
             lambda: explain.Explain(explain_request(), timeout=30)]
    answers: list[tuple[float, float, int]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(call):
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = call()
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            answers.append((sent, time.monotonic(), int(response.model_version)))

    threads = [threading.Thread(target=client, args=(calls[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        add_version(repo, small_export.path, 3)  # the newest: unversioned requests move to it
        remove_version(repo, 1)
        assert wait_until(lambda: any(v == 3 for _, _, v in answers[-20:]))
        time.sleep(0.5)
        remove_version(repo, 2)  # the version that was answering until now
        assert wait_until(lambda: any(v == 2 for _, _, v, w in server.repository.history
                                      if w == "unloaded"))
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    history = list(server.repository.history)
    wrong = [a for a in answers if not served_at(history, a[2], a[0], a[1])]
    assert wrong == []
    versions = [v for _, _, v in answers]
    assert {2, 3} <= set(versions) and versions[-1] == 3
    assert len(answers) > 50
    assert server.repository.versions("shapes") == [3]


@contextlib.contextmanager
def unversioned_requests(channel):
    """One client sending ModelInfer without a version back to back while the body runs:
    yields (answers: the versions that answered, failures: the gRPC errors)."""
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    answers: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                answers.append(int(kserve.ModelInfer(infer_request(), timeout=30).model_version))
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
    thread = threading.Thread(target=client)
    thread.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def server_on(repo: Path, latest_versions: int, **options):
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0, poll_seconds=0.2,
                              metrics_port=0,
                              defaults=ModelSettings(latest_versions=latest_versions), **options)
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(grace=1)


def when(history, version: int, what: str) -> float:
    return next(t for t, _, v, w in history if v == version and w == what)


def test_latest_versions_bounds_what_is_loaded_and_hands_over_without_a_gap(small_export,
                                                                           tmp_path):
    """Every version on disk was compiled (up to six copies each): a repository that keeps
    each daily export grows the server without bound. With `latest_versions` only the newest
    N load, and an older one goes once its replacement is ready, not before."""
    for version in (1, 2, 3):
        shutil.copytree(small_export.path, tmp_path / "shapes" / str(version))
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        assert server.repository.versions("shapes") == [3]  # 1 and 2 never compiled
        with unversioned_requests(channel) as (answers, failures):
            add_version(tmp_path, small_export.path, 4)
            assert wait_until(lambda: server.repository.versions("shapes") == [4])
            time.sleep(0.3)
        assert failures == [] and answers[-1] == 4 and set(answers) == {3, 4}
        history = list(server.repository.history)
        assert [v for _, _, v, what in history if what == "unloaded"] == [3]
        assert when(history, 4, "ready") <= when(history, 3, "unloaded")  # 3 went after 4


def test_removing_the_served_version_keeps_it_until_the_one_before_is_ready(small_export,
                                                                          tmp_path):
    """Rolling back by deleting the newest version: with `latest_versions: 1` the one before
    it was never compiled, and dropping the deleted one at once left unversioned requests
    UNAVAILABLE for the seconds its predecessor took to compile. Its weights are in memory,
    so it answers until then."""
    for version in (1, 2):
        shutil.copytree(small_export.path, tmp_path / "shapes" / str(version))
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        assert server.repository.versions("shapes") == [2]
        with unversioned_requests(channel) as (answers, failures):
            assert wait_until(lambda: len(answers) > 5)
            remove_version(tmp_path, 2)
            assert wait_until(lambda: server.repository.versions("shapes") == [1])
            time.sleep(0.3)
        assert failures == [] and answers[0] == 2 and answers[-1] == 1
        history = list(server.repository.history)
        assert when(history, 1, "ready") <= when(history, 2, "unloaded")
        assert server.repository.state("shapes").ready


def test_a_pinned_version_rolls_back_without_deleting_and_a_missing_pin_serves_on(
        small_export, tmp_path, caplog):
    """Rolling back meant deleting the bad export (lost for the post-mortem). `versions: [2]`
    in the config pins the one before: compiled while 3 answers, then alone. A pin naming a
    version that is not there must not leave the model unserved."""
    for version in (1, 2, 3):
        shutil.copytree(small_export.path, tmp_path / "shapes" / str(version))

    def pin(*versions):
        models = {"shapes": ModelSettings(latest_versions=1, versions=versions or None)}
        server.reload_settings(dataclasses.replace(server.settings, models=models))
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert server.repository.versions("shapes") == [3]
        with unversioned_requests(channel) as (answers, failures):
            assert wait_until(lambda: len(answers) > 5)
            pin(2)
            assert wait_until(lambda: server.repository.versions("shapes") == [2])
            time.sleep(0.3)
        assert failures == [] and answers[0] == 3 and answers[-1] == 2
        history = list(server.repository.history)
        assert when(history, 2, "ready") <= when(history, 3, "unloaded")
        index = {m.version: (m.state, m.reason)
                 for m in kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models}
        assert index["3"] == ("UNAVAILABLE", "not loaded: outside the versions [2] pinned by "
                                             "the config")
        assert index["2"] == ("READY", "")

        with caplog.at_level(logging.WARNING, logger="xaiserve.repository"):
            pin(7)  # a typo
            time.sleep(1.0)  # five polls: warned once, 2 serves on
        assert server.repository.versions("shapes") == [2]
        assert kserve.ModelInfer(infer_request()).model_version == "2"
        warnings = [r.getMessage() for r in caplog.records if "not on disk" in r.getMessage()]
        assert warnings == ["shapes: the config pins versions [7], not on disk (has [1, 2, 3])"]
        index = {m.version: (m.state, m.reason)
                 for m in kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models}
        assert index["7"] == ("UNAVAILABLE", "pinned by the config, not on disk")

        pin()  # unpinned: latest_versions 1 again
        assert wait_until(lambda: server.repository.versions("shapes") == [3])


def break_weights(version_dir: Path) -> None:
    """Weights cut short that OpenVINO itself refuses: without the card (an IR exported
    elsewhere), whose SHA-256 list would refuse them first (tests/test_version_files.py)."""
    (version_dir / "model_card.json").unlink(missing_ok=True)
    weights = version_dir / "model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])


def test_a_newest_version_that_fails_to_load_falls_back_to_the_one_before(small_export,
                                                                        tmp_path):
    """A broken newest export (weights cut short) left nothing served with `latest_versions:
    1` when the server started: the version before it was never compiled. It now takes the
    broken one's place; the broken one stays listed with its reason, and takes over once its
    files are mended."""
    for version in (1, 2, 3):
        shutil.copytree(small_export.path, tmp_path / "shapes" / str(version))
    break_weights(tmp_path / "shapes" / "3")
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        assert server.repository.versions("shapes") == [2, 3]  # 1 never compiled
        broken = server.repository.state("shapes", 3)
        assert not broken.ready and "weights" in broken.error.lower()
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="shapes")).ready
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name="shapes", version="3")).ready
        # serving the one before hides the broken export from clients, not from alerts
        versions = {labels: value for (name, labels), value
                    in scrape(server.metrics_port)["xaiserve_model_versions"].items()}
        assert versions == {(("model", "shapes"), ("state", "ready"), ("version", "2")): 1,
                            (("model", "shapes"), ("state", "failed"), ("version", "3")): 1}
        with unversioned_requests(channel) as (answers, failures):
            assert wait_until(lambda: len(answers) > 5)
            shutil.copy(small_export.path / "model.bin", tmp_path / "shapes" / "3")  # mended
            assert wait_until(lambda: server.repository.versions("shapes") == [3])
            time.sleep(0.3)
        assert failures == [] and answers[0] == 2 and answers[-1] == 3
        history = list(server.repository.history)
        assert when(history, 3, "ready") <= when(history, 2, "unloaded")


def health_of(channel, service: str) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_each_model_has_a_health_status_of_its_own(small_export, tmp_path):
    """The health service answered for the whole server only, so a probe or a load balancer
    could not tell that one model had nothing ready. The model's name is now a service name:
    SERVING with a ready version, NOT_SERVING without, SERVICE_UNKNOWN once removed; a Watch
    gets each change. The server ("") is ready only while every model serves a version (it
    said SERVING with a model it could not answer for); the API services say it is alive."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    shutil.copytree(small_export.path, tmp_path / "broken" / "1")
    break_weights(tmp_path / "broken" / "1")
    live = "inference.GRPCInferenceService"
    with server_on(tmp_path, latest_versions=0) as (server, channel):
        assert [health_of(channel, s) for s in ("", live, "shapes", "broken", "nope")] == [
            "NOT_SERVING", "SERVING", "SERVING", "NOT_SERVING", "NOT_FOUND"]
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert not kserve.ServerReady(kpb.ServerReadyRequest()).ready
        assert kserve.ServerLive(kpb.ServerLiveRequest()).live
        assert check_health(f"127.0.0.1:{server.port}", "shapes") == "SERVING"  # `xaiserve health`
        with pytest.raises(HealthError, match="NOT_FOUND: the server has no health status for "
                                              "--service 'shape'; give a served model's name"):
            check_health(f"127.0.0.1:{server.port}", "shape")  # grpc-health's NOT_FOUND is bare
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="broken"), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        shutil.copy(small_export.path / "model.bin", tmp_path / "broken" / "1")  # mended
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert health_of(channel, "") == "SERVING"  # every model serves: ready
        assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
        shutil.rmtree(tmp_path / "shapes")
        assert wait_until(lambda: health_of(channel, "shapes") == "SERVICE_UNKNOWN")
        assert health_of(channel, "broken") == "SERVING"
        server.health.enter_graceful_shutdown()  # what stop() does first: every status goes
        assert health_of(channel, "broken") == health_of(channel, live) == "NOT_SERVING"


def test_without_strict_readiness_a_broken_model_leaves_the_server_ready(small_export,
                                                                          tmp_path, caplog):
    """A pod of many models: with strict_readiness false (Triton's --strict-readiness false)
    one broken export keeps neither the pod nor its other models out of their Service; the
    broken model is still NOT_SERVING and not ready on its own, and the log says so."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    shutil.copytree(small_export.path, tmp_path / "broken" / "1")
    break_weights(tmp_path / "broken" / "1")
    with caplog.at_level(logging.WARNING, logger="xaiserve.server"), \
            server_on(tmp_path, latest_versions=0, strict_readiness=False,
                      rest_port=0) as (server, channel):
        assert [health_of(channel, s) for s in ("", "shapes", "broken")] == [
            "SERVING", "SERVING", "NOT_SERVING"]
        kserve = kgrpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name="broken")).ready
        rest = f"http://127.0.0.1:{server.rest.port}"
        assert urllib.request.urlopen(f"{rest}/v2/health/ready", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError) as broken:
            urllib.request.urlopen(f"{rest}/v2/models/broken/ready", timeout=10)
        assert broken.value.code != 200
        assert kserve.ModelInfer(infer_request(), timeout=30).model_name == "shapes"
    assert "the server is ready all the same (strict_readiness false)" in caplog.text
    assert "'broken'" in caplog.text


def test_the_strict_readiness_flag_takes_true_or_false(tmp_path):
    ok = run_cli("serve", "--repository", str(tmp_path), "--strict-readiness", "false",
                 "--check-config")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("serve", "--repository", str(tmp_path), "--strict-readiness", "maybe",
                  "--check-config")
    assert bad.returncode == 2
    assert "--strict-readiness: 'maybe': give true or false" in bad.stderr


def test_a_reload_that_fails_to_compile_reports_the_settings_still_served(small_export,
                                                                        tmp_path, caplog):
    """A reloaded config whose compile failed kept the old copy serving, but ModelConfig and
    ModelInfo reported the new settings: a client read a device the model was not on."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    with server_on(tmp_path, latest_versions=0) as (server, channel), \
            caplog.at_level(logging.ERROR, logger="xaiserve.repository"):
        unknown = ModelSettings(device="HETERO:NOPE", performance_hint="LATENCY")
        server.reload_settings(dataclasses.replace(server.settings, defaults=unknown))
        assert wait_until(lambda: any("keeps serving as loaded before" in r.getMessage()
                                      for r in caplog.records))
        # counted as a failed reload: the alert on it fires, though the file itself loaded
        assert server.telemetry.registry.get_sample_value(
            "xaiserve_config_reloads_total", {"result": "failed"}) == 1
        config = kgrpc.GRPCInferenceServiceStub(channel).ModelConfig(
            kpb.ModelConfigRequest(name="shapes")).config
        assert config.parameters["device"].string_value == "CPU"
        assert config.parameters["performance_hint"].string_value == "THROUGHPUT"
        info = xgrpc.ExplanationServiceStub(channel).ModelInfo(
            xpb.ModelInfoRequest(model_name="shapes"))
        assert info.ready and info.device == "CPU"
        answer = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request())
        assert answer.model_version == "1"


def test_the_repository_index_lists_every_version_and_load_does_not_wait_for_the_poll(
        small_export, tmp_path):
    """Triton's repository extension: an operator sees what is on disk and why a version is
    not served; a pipeline that has just exported a version asks to load it and is answered
    once it serves (or why it does not) instead of guessing at the poll."""
    for version in (1, 2):
        shutil.copytree(small_export.path, tmp_path / "shapes" / str(version))
    shutil.copytree(small_export.path, tmp_path / "broken" / "1")
    break_weights(tmp_path / "broken" / "1")
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0, poll_seconds=3600,
                              defaults=ModelSettings(latest_versions=1))
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    try:
        index = [(m.name, m.version, m.state, m.reason) for m in
                 kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models]
        assert index[0][:3] == ("broken", "1", "UNAVAILABLE") and "weights" in index[0][3]
        assert index[1:] == [
            ("shapes", "1", "UNAVAILABLE", "not loaded: outside the latest_versions 1"),
            ("shapes", "2", "READY", "")]
        ready = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models
        assert [(m.name, m.version) for m in ready] == [("shapes", "2")]

        shutil.copytree(small_export.path, tmp_path / "shapes" / "3")  # the poll is an hour off
        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="shapes"),
                                   timeout=120)
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="shapes", version="3")).ready
        assert kserve.ModelInfer(infer_request()).model_version == "3"

        refusals = {
            "broken": (kserve.RepositoryModelLoad,
                       kpb.RepositoryModelLoadRequest(model_name="broken")),
            "nope": (kserve.RepositoryModelLoad,
                     kpb.RepositoryModelLoadRequest(model_name="nope")),
            "parameters": (kserve.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(
                model_name="shapes",
                parameters={"config": kpb.ModelRepositoryParameter(string_param="{}")})),
            "repository": (kserve.RepositoryIndex,
                           kpb.RepositoryIndexRequest(repository_name="other")),
            "unload": (kserve.RepositoryModelUnload,
                       kpb.RepositoryModelUnloadRequest(model_name="shapes")),
        }
        seen = {}
        for case, (call, request) in refusals.items():
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=60)
            seen[case] = (info.value.code().name, info.value.details())
        assert seen["broken"][0] == "FAILED_PRECONDITION" and "weights" in seen["broken"][1]
        assert seen["nope"][0] == "NOT_FOUND" and "export it there first" in seen["nope"][1]
        assert seen["parameters"][0] == "INVALID_ARGUMENT" and "'config'" in seen["parameters"][1]
        assert seen["repository"][0] == "INVALID_ARGUMENT"
        assert seen["unload"][0] == "FAILED_PRECONDITION"
        assert str(tmp_path / "shapes") in seen["unload"][1]
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="shapes")).ready  # still serving

        # the same from a pipeline's shell: `xaiserve models`
        address = f"127.0.0.1:{server.port}"
        table = run_cli("models", "--server", address)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split() == ["NAME", "VERSION", "STATE", "REASON"]
        assert table.stdout.splitlines()[-1].split() == ["shapes", "3", "READY"]
        listed = json.loads(run_cli("models", "--server", address, "--json", "--ready").stdout)
        assert listed == [{"name": "shapes", "version": 3, "state": "READY", "reason": ""}]
        shutil.copytree(small_export.path, tmp_path / "shapes" / "4")
        loaded = run_cli("models", "--server", address, "--load", "shapes")
        assert (loaded.returncode, loaded.stdout) == (0, "shapes version 4 serves\n")
        failed = run_cli("models", "--server", address, "--load", "broken")
        assert failed.returncode == 1 and "FAILED_PRECONDITION" in failed.stderr
        assert run_cli("models", "--server", "127.0.0.1:99999").returncode == 2
    finally:
        channel.close()
        server.stop(grace=1)


def test_a_version_that_fails_while_serving_leaves_the_served_one_in_place(small_export,
                                                                         tmp_path):
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    with server_on(tmp_path, latest_versions=1) as (server, channel):
        staging = tmp_path / "shapes" / ".staging-2"
        shutil.copytree(small_export.path, staging)
        break_weights(staging)
        os.rename(staging, tmp_path / "shapes" / "2")
        assert wait_until(lambda: any(s.error for s in server.repository.states("shapes")))
        time.sleep(1.0)  # several polls: 2 is not compiled again, 1 stays
        assert server.repository.versions("shapes") == [1, 2]
        assert server.repository.state("shapes").version == 1
        loads = [v for _, _, v, what in server.repository.history if what == "ready"]
        assert loads == [1]


def test_a_repository_folder_that_is_gone_for_a_while_keeps_what_is_loaded(small_export,
                                                                           tmp_path, caplog):
    """A volume remounting, or a folder swapped by two renames, made a scan find nothing, and
    every model was unloaded: an outage until they compiled again."""
    repo = tmp_path / "models"
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    with server_on(repo, latest_versions=0) as (server, channel):
        with caplog.at_level(logging.INFO, logger="xaiserve.repository"), \
                unversioned_requests(channel) as (answers, failures):
            os.rename(repo, tmp_path / "models.old")
            time.sleep(1.0)  # five polls
            os.rename(tmp_path / "models.old", repo)
            assert wait_until(lambda: any("can be read again" in r.getMessage()
                                          for r in caplog.records), 10)
        assert failures == [] and len(answers) > 10
        assert [w for _, _, _, w in server.repository.history] == ["ready"]  # never unloaded
        messages = [r.getMessage() for r in caplog.records]
        assert sum("cannot read the repository" in m for m in messages) == 1  # once, not per poll
        remove_version(repo, 1)  # what is removed inside a readable repository still goes
        assert wait_until(lambda: server.repository.names() == [])


def test_a_model_folder_unreadable_for_a_while_is_said_once_each_way(tmp_path, caplog,
                                                                      monkeypatch):
    """A folder this server may not list is warned about once, and said again when it can be
    read (nothing was logged then). The tests run as root, whom permissions do not stop: the
    listing's EACCES is raised in its place."""
    from xaiserve.service import repository as repository_module

    (tmp_path / "shapes" / "1").mkdir(parents=True)
    (tmp_path / "shapes" / "1" / "model.xml").write_text("<net/>")
    listing, blocked = repository_module.version_dirs, [True]

    def version_dirs_or_eacces(model_dir: Path):
        if blocked[0] and model_dir == tmp_path / "shapes":
            raise PermissionError(13, "Permission denied", str(model_dir))
        return listing(model_dir)
    monkeypatch.setattr(repository_module, "version_dirs", version_dirs_or_eacces)
    repository = repository_module.ModelRepository(ServerSettings(repository=tmp_path))
    with caplog.at_level(logging.INFO, logger="xaiserve.repository"):
        for _ in range(3):
            assert repository._scan() == {}
        blocked[0] = False
        assert list(repository._scan()) == ["shapes"]
    # Only this repository's lines: a server that other tests started scans its own on a
    # thread of its own meanwhile, and logs to the same logger.
    messages = [r.getMessage() for r in caplog.records if str(tmp_path) in r.getMessage()]
    assert messages == [f"cannot read {tmp_path / 'shapes'} (Permission denied); its loaded "
                        "versions keep serving until it can be",
                        f"{tmp_path / 'shapes'} can be read again"]


def test_a_model_file_other_than_our_ir_is_named_with_the_export_that_serves_it(
        small_export, tmp_path, caplog):
    """An OpenVINO Model Server repository holds `<name>/1/model.onnx`; this server compiles
    only the IRs `xaiserve export` writes and passed such a folder over without a word
    ("serving nothing"). Now one warning per folder (not per poll), also from --check-config,
    gives the command; run as it says, the model serves."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    (tmp_path / "keras" / "1").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "data" / "keras_cnn" / "model.onnx",
                tmp_path / "keras" / "1" / "model.onnx")
    check = run_cli("serve", "--repository", str(tmp_path), "--check-config")
    assert check.returncode == 0, check.stderr[-2000:]
    hint = (f"{tmp_path / 'keras' / '1'} holds model.onnx and no model.xml, so it is not served")
    assert hint in check.stderr and "would load shapes versions [1]" in check.stdout

    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0, poll_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="xaiserve.repository"):
        server = Server(settings).start()
        try:
            time.sleep(1.0)  # a few polls
            warned = [r.getMessage() for r in caplog.records if hint in r.getMessage()]
            assert len(warned) == 1, warned
            command = warned[0].split("run `xaiserve ", 1)[1].split("`")[0].split()
            assert command[:2] == ["export", str(tmp_path / "keras" / "1" / "model.onnx")]
            result = run_cli(*command)
            assert result.returncode == 0, result.stderr[-2000:]
            assert wait_until(lambda: server.repository.serves("keras"), 30)
            assert server.repository.versions("keras") == [2]
        finally:
            server.stop(grace=0)
    assert sum(hint in r.getMessage() for r in caplog.records) == 1


def test_a_config_entry_for_a_model_not_in_the_repository_is_warned_about(small_export,
                                                                          tmp_path, caplog):
    """`models: {shape: {latest_versions: 1}}` meant for `shapes` was ignored without a word."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                              models={"shape": ModelSettings(latest_versions=1),
                                      "shapes": ModelSettings()})
    with caplog.at_level(logging.WARNING, logger="xaiserve.server"):
        server = Server(settings).start()
    server.stop(grace=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "models.shape," in warnings[0]
    assert "(it has: shapes)" in warnings[0]


def test_version_folders_are_positive_and_one_per_number(tmp_path):
    """"0" was served as a version no request can name (0 means the newest), and of "1" and
    "01" the directory order picked one, so a restart could serve the other."""
    for name in ("0", "01", "1", "001", "2", "x", "-3", "+4"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file")
    assert version_dirs(tmp_path) == {1: tmp_path / "1", 2: tmp_path / "2"}
    (tmp_path / "1").rmdir()
    assert version_dirs(tmp_path)[1] == tmp_path / "01"


def test_version_plan_is_the_newest_that_did_not_fail_or_the_pinned():
    disk = {v: Path(str(v)) for v in (1, 2, 3, 4)}

    def plan(failed, latest=0, pinned=None):
        return plan_versions(disk, ModelSettings(latest_versions=latest, versions=pinned),
                             failed)
    assert plan(set()) == (disk, {})
    assert plan(set(), latest=2) == ({4: disk[4], 3: disk[3]}, {})
    assert plan({4}, latest=1) == ({3: disk[3]}, {4: disk[4]})
    assert plan({4, 3}, latest=1) == ({2: disk[2]}, {4: disk[4], 3: disk[3]})
    assert plan({3}, latest=2) == ({4: disk[4], 2: disk[2]}, {3: disk[3]})
    assert plan({2}) == ({4: disk[4], 3: disk[3], 1: disk[1]}, {2: disk[2]})
    assert plan({1, 2, 3, 4}, latest=1) == ({}, disk)
    # pinned versions: exactly those on disk, whatever latest_versions says; no fallback
    assert plan(set(), latest=1, pinned=[2]) == ({2: disk[2]}, {})
    assert plan(set(), pinned=[1, 3, 7]) == ({3: disk[3], 1: disk[1]}, {})
    assert plan({3}, pinned=[3]) == ({}, {3: disk[3]})


def client_ports(server_port: int, side: str = "client") -> set[int]:
    """Client ports of the TCP connections to `server_port` on 127.0.0.1 now established on
    the client's side (or the server's) (from /proc/net/tcp; not gRPC's connectivity
    subscriptions, which can crash a closing channel)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC's sockets may be IPv4-mapped v6
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            ours, theirs = (int(a.rsplit(":", 1)[1], 16) for a in (local, remote))
            if side == "server":
                ours, theirs = theirs, ours
            if state == "01" and theirs == server_port:
                ports.add(ours)
    return ports


def test_connections_are_closed_after_their_max_age_and_calls_go_on(small_export, tmp_path):
    """gRPC keeps one connection to one pod, so replicas an autoscaler adds got no traffic from
    clients already connected. With `max_connection_age` the server closes a connection once
    it is that old (GOAWAY; in-flight calls finish) and the client connects again."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                              max_connection_age=0.5)
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    kserve = kgrpc.GRPCInferenceServiceStub(channel)
    try:
        answered, connections = 0, set()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            kserve.ModelInfer(infer_request(), timeout=30)  # raises if one is lost
            answered += 1
            connections |= client_ports(server.port)
            time.sleep(0.05)
        assert answered > 10 and len(connections) >= 3, connections  # connected anew twice
    finally:
        channel.close()
        server.stop(grace=0)


KEEPALIVE_CLIENT = """
import sys, time, grpc
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb, grpc_predict_v2_pb2_grpc as kgrpc
channel = grpc.insecure_channel(sys.argv[1], options=[
    ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0)])
kgrpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest(), timeout=10)
print("connected", flush=True)
time.sleep(60)
"""


def test_keepalive_pings_are_accepted_and_vanished_clients_let_go(tmp_path):
    """An edge device pinging to keep its connection through a NAT was sent GOAWAY
    "too_many_pings" after three idle pings (gRPC's default allows one in two hours without
    calls), and a device that vanished held its connection for hours. Client pings are now
    accepted as often as `min_client_ping_interval`, and the server pings idle connections
    (`keepalive_time`), closing those that do not answer."""
    settings = ServerSettings(repository=tmp_path, host="127.0.0.1", port=0,
                              min_client_ping_interval=0.5, keepalive_time=1.0,
                              keepalive_timeout=1.0)
    server = Server(settings).start()
    client = subprocess.Popen([sys.executable, "-c", KEEPALIVE_CLIENT, f"127.0.0.1:{server.port}"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert client.stdout.readline().strip() == "connected"
        first = client_ports(server.port)
        time.sleep(5)  # five idle pings each way
        assert len(first) == 1 and client_ports(server.port) == first  # never sent away
        assert client_ports(server.port, side="server") == first
        client.send_signal(signal.SIGSTOP)  # the device vanishes: nothing answers pings
        assert wait_until(lambda: not client_ports(server.port, side="server"), timeout=10)
    finally:
        client.kill()
        client.wait()
        server.stop(grace=0)


# --- the client across a server's restart --------------------------------------------------------

class FlakyExplanationService(xgrpc.ExplanationServiceServicer):
    """A real gRPC server that answers ModelInfo with `code` for its first `failures` calls:
    what a client meets while a server restarts, drains or compiles a version."""

    def __init__(self, failures: int, code: grpc.StatusCode):
        self.failures, self.code, self.calls = failures, code, 0

    def ModelInfo(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "not now")
        return xpb.ModelInfoResponse(model_name=request.model_name)


@pytest.mark.parametrize("failures, code, retries, answered, calls", [
    (2, grpc.StatusCode.UNAVAILABLE, 4, True, 3),  # retried until answered
    (9, grpc.StatusCode.UNAVAILABLE, 4, False, 5),  # gRPC's cap: five attempts
    (2, grpc.StatusCode.UNAVAILABLE, 0, False, 1),  # a benchmark's load: failures counted
    (2, grpc.StatusCode.INVALID_ARGUMENT, 4, False, 1),  # an answer, not a hiccup
])
def test_the_client_retries_unavailable_calls(failures, code, retries, answered, calls):
    """An edge device's call during a server's restart failed at once with UNAVAILABLE."""
    from concurrent import futures

    service = FlakyExplanationService(failures, code)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    xgrpc.add_ExplanationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = XaiClient(f"127.0.0.1:{port}", timeout=30, retries=retries)
    try:
        if answered:
            assert client.model_info("shapes").model_name == "shapes"
        else:
            with pytest.raises(grpc.RpcError) as error:
                client.model_info("shapes")
            assert error.value.code() == code
        assert service.calls == calls
    finally:
        client.close()
        server.stop(0)


# --- graceful shutdown of the `xaiserve serve` process ------------------------------------------

def test_sigterm_finishes_requests_in_flight_then_exits(small_export, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    grace = 60
    process = subprocess.Popen(
        [sys.executable, "-m", "xaiserve.service.cli", "serve", "--repository", str(repo),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-format", "json",
         "--shutdown-grace", str(grace), "--max-black-box-masks", "20000", "--rest-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = process.stdout.readline()
        assert "serving" in line, process.stderr.read()
        port = int(line.rsplit("on port ", 1)[1])
        rest_port = int(process.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        metrics_port = int(process.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        client = XaiClient(f"127.0.0.1:{port}", retries=0)  # the refusal below, at once
        results: dict[int, object] = {}
        finished: dict[int, float] = {}

        def slow(seed: int) -> None:
            """Seed 1 over gRPC, seed 2 over the REST side: both drain."""
            request = explain_request(xpb.METHOD_BLACK_BOX, masks=8000, seed=seed)
            try:
                if seed == 1:
                    results[seed] = client.stub.Explain(request, timeout=120)
                else:
                    results[seed] = json_format.ParseDict(
                        RestClient(f"127.0.0.1:{rest_port}").explain(request),
                        xpb.ExplainResponse())
            except (grpc.RpcError, RestError) as exc:
                results[seed] = exc
            finished[seed] = time.monotonic()

        threads = [threading.Thread(target=slow, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: scrape(metrics_port)["xaiserve_requests_in_flight"][
            ("xaiserve_requests_in_flight", ())] == 2)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        def refused(call) -> bool:
            try:
                call()
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
            except ConnectionRefusedError:
                return True
            return False

        # no new requests once stopping (the stop takes a few tenths of a second to begin)
        assert wait_until(lambda: refused(lambda: client.stub.ModelInfo(
            xpb.ModelInfoRequest(model_name="shapes"), timeout=10)), 10)
        assert wait_until(lambda: refused(lambda: RestClient(f"127.0.0.1:{rest_port}").get(
            "/v2/health/live")), 10)
        for t in threads:
            t.join()
        for seed in (1, 2):
            assert isinstance(results[seed], xpb.ExplainResponse), results[seed]
            assert results[seed].maps[0].method == "rise"
            assert finished[seed] > signalled  # they were in flight when the signal came
        assert process.wait(timeout=grace) == 0
        client.close()
        events = [json.loads(line) for line in process.stderr.read().splitlines()
                  if line.startswith("{")]
        assert any("shutting down" in e["message"] for e in events)
        assert sum(e.get("method") == "Explain" and e.get("code") == "OK" for e in events) == 2
        assert sum(e.get("protocol") == "http" and e.get("method") == "Explain"
                   for e in events) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- the config reloaded on SIGHUP ----------------------------------------------------------------

@pytest.mark.parametrize("signalled", [True, False], ids=["SIGHUP", "file-changed"])
def test_a_changed_config_is_applied_without_a_failed_request(small_export, tmp_path,
                                                              signalled):
    """Changing a model's settings meant a restart (SIGHUP killed the server outright). Now the
    config is read again on SIGHUP or when the file changes (a ConfigMap update): changed
    models are compiled anew while their old copies answer, `latest_versions` applies, server
    settings wait for a restart, and a broken config leaves the server on the one it had."""
    watching = ["--no-watch-config"] if signalled else []
    repo = tmp_path / "models"
    for version in (1, 2):
        shutil.copytree(small_export.path, repo / "shapes" / str(version))
    config = tmp_path / "serve.yaml"
    config.write_text("models:\n  shapes: {performance_hint: LATENCY}\n")
    log_file = tmp_path / "server.log"
    with open(log_file, "w") as log:  # a pipe would fill with the request lines and block it
        process = subprocess.Popen(
            [sys.executable, "-m", "xaiserve.service.cli", "serve", "--repository", str(repo),
             "--host", "127.0.0.1", "--port", "0", "--config", str(config), "--log-format",
             "json", "--poll-seconds", "0.2", "--metrics-port", "0", *watching],
            stdout=subprocess.PIPE, stderr=log, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = process.stdout.readline()
        assert "serving" in line, log_file.read_text()
        channel = grpc.insecure_channel(f"127.0.0.1:{int(line.rsplit('on port ', 1)[1])}")
        metrics_port = int(process.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        kserve = kgrpc.GRPCInferenceServiceStub(channel)

        def infer_requests() -> int:
            return kserve.ModelConfig(kpb.ModelConfigRequest(name="shapes"), timeout=10) \
                .config.instance_group[0].count

        def versions() -> list[str]:
            return list(kserve.ModelMetadata(kpb.ModelMetadataRequest(name="shapes"),
                                             timeout=10).versions)
        latency_requests = infer_requests()  # what the LATENCY hint compiled
        assert versions() == ["1", "2"]
        with unversioned_requests(channel) as (answers, failures):
            config.write_text("models:\n"
                              "  shapes: {performance_hint: THROUGHPUT, latest_versions: 1}\n"
                              "server: {max_concurrent_requests: 8}\n")
            if signalled:
                process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: infer_requests() > latency_requests
                              and versions() == ["2"])
            config.write_text("models: [not, a, mapping]\n")
            if signalled:
                process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: scrape(metrics_port)["xaiserve_config_reloads"][
                ("xaiserve_config_reloads_total", (("result", "failed"),))] >= 1, 10)
            time.sleep(0.5)  # requests go on being answered after the failed reload
        assert failures == [] and len(answers) > 10
        assert infer_requests() > latency_requests and process.poll() is None
        reloads = scrape(metrics_port)["xaiserve_config_reloads"]
        assert reloads[("xaiserve_config_reloads_total", (("result", "applied"),))] >= 1
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    messages = [json.loads(line)["message"] for line in log_file.read_text().splitlines()
                if line.startswith("{")]
    assert any("config reloaded; recompiling shapes" in m for m in messages)
    assert "config reloaded: shapes: performance_hint 'LATENCY' -> 'THROUGHPUT'; " \
           "latest_versions 0 -> 1" in messages
    assert any("max_concurrent_requests take effect only at a restart" in m for m in messages)
    assert any(m.startswith("config not reloaded, serving on with the one before: ")
               and "models" in m for m in messages)
