"""The REST side of the Open Inference Protocol on a real port, called as curl or a pipeline's
script would (plain HTTP from the standard library): the same answers as gRPC, bad bodies
answered with an HTTP status and a message naming the field, the same token, caps, metrics,
access log and TLS as the gRPC side. The standard REST clients (tritonclient.http, KServe's
InferenceRESTClient, perf_analyzer -i http) are in tests/test_standard_clients.py."""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import logging
import shutil
import socket
import ssl
import time

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaiserve.service import logs
from xaiserve.service.config import ConfigError, ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc
from xaiserve.service.rest import endpoints
from xaiserve.service.server import Server

from tests.conftest import run_cli
from tests.test_operations import IMAGE, infer_request, sample, scrape, wait_until
from tests.test_security import pki  # noqa: F401 - the fixture

MODEL = "/v2/models/shapes"


@pytest.fixture(scope="module")
def rest(small_export, tmp_path_factory):
    """A server on the small model with both sides, metrics, a token, and small limits."""
    repo = tmp_path_factory.mktemp("rest")
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    token = repo.parent / "rest-token"
    token.write_text("secret-token\n")
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0, rest_port=0,
                              metrics_port=0, token_file=token, max_concurrent_requests=2,
                              max_message_bytes=1024 * 1024, response_compression="gzip",
                              defaults=ModelSettings(black_box_masks=100,
                                                     max_black_box_masks=50_000))
    server = Server(settings).start()
    yield server
    server.stop(grace=1)


AUTH = {"Authorization": "Bearer secret-token"}


def call(server, verb: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None, auth: bool = True) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request to the server's REST port."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest.port, timeout=120)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection.request(verb, path, body=body, headers={**(AUTH if auth else {}),
                                                       **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def json_infer(outputs: list[dict] | None = None, **fields) -> dict:
    body = {"id": "rest-1", "inputs": [{"name": "image", "shape": [1, 64, 64, 3],
                                        "datatype": "UINT8", "data": IMAGE.ravel().tolist()}]}
    if outputs is not None:
        body["outputs"] = outputs
    return {**body, **fields}


def binary_infer(images: np.ndarray, outputs: list[dict]) -> tuple[bytes, dict]:
    """(body, headers) of an inference request whose pixels travel as binary tensor data."""
    header = json.dumps({"inputs": [{"name": "image", "shape": list(images.shape),
                                     "datatype": "UINT8",
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "outputs": outputs}).encode()
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def grpc_answer(server) -> kpb.ModelInferResponse:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        request = infer_request()
        request.outputs.add(name="logits")
        request.outputs.add(name="saliency_map")
        return kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("authorization", AUTH["Authorization"]),), timeout=30)


def tensor(response: kpb.ModelInferResponse, index: int) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(
        response.outputs[index].shape)


def test_json_inference_answers_as_grpc_does(rest):
    status, headers, body = call(rest, "POST", f"{MODEL}/infer", json_infer(
        [{"name": "logits"}, {"name": "saliency_map"}]))
    assert status == 200 and headers["content-type"] == "application/json", body[:300]
    answer = json.loads(body)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("shapes", "1",
                                                                             "rest-1")
    logits, saliency = answer["outputs"]
    reference = grpc_answer(rest)
    assert logits["shape"] == [1, 3] and saliency["shape"] == list(reference.outputs[1].shape)
    np.testing.assert_allclose(logits["data"], tensor(reference, 0).ravel(), rtol=1e-6)
    np.testing.assert_allclose(saliency["data"], tensor(reference, 1).ravel(), rtol=1e-6)
    assert answer["parameters"]["inference_ms"] > 0  # the server's split of the request

    # nested data, a version in the path, and the classification extension
    status, _, body = call(rest, "POST", f"{MODEL}/versions/1/infer", {
        "inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                    "data": IMAGE.tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}]})
    assert status == 200, body
    (top,) = json.loads(body)["outputs"]
    best = int(np.argmax(tensor(reference, 0)))
    assert top["datatype"] == "BYTES" and top["shape"] == [1, 2]
    assert top["data"][0].split(":")[1] == str(best)


def test_binary_tensors_and_encoded_images(rest):
    """Triton's binary tensor data extension both ways, and a PNG as a base64 BYTES element."""
    status, headers, body = call(rest, "POST", f"{MODEL}/infer", *binary_infer(
        IMAGE[None], [{"name": "logits", "parameters": {"binary_data": True}}]))
    assert status == 200 and headers["content-type"] == "application/octet-stream", body[:300]
    size = int(headers["inference-header-content-length"])
    (output,) = json.loads(body[:size])["outputs"]
    assert output["parameters"]["binary_data_size"] == 12 == len(body) - size
    np.testing.assert_allclose(np.frombuffer(body[size:], np.float32),
                               tensor(grpc_answer(rest), 0).ravel(), rtol=1e-6)

    png = base64.b64encode(cv2.imencode(".png", IMAGE[:, :, ::-1])[1].tobytes()).decode()
    status, _, body = call(rest, "POST", f"{MODEL}/infer", {"inputs": [{
        "name": "image", "shape": [1], "datatype": "BYTES", "data": [png],
        "parameters": {"content_type": "base64"}}]})
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"],
                               tensor(grpc_answer(rest), 0).ravel(), rtol=1e-6)


def test_metadata_health_config_statistics_and_repository(rest):
    assert call(rest, "GET", "/v2")[0] == 200
    assert json.loads(call(rest, "GET", "/v2")[2])["name"] == "xaiserve"
    status, _, body = call(rest, "GET", MODEL)
    metadata = json.loads(body)
    assert status == 200 and metadata["inputs"][0] == {"name": "image", "datatype": "UINT8",
                                                       "shape": [-1, 64, 64, 3]}
    assert call(rest, "GET", f"{MODEL}/ready")[:1] == (200,)
    assert call(rest, "GET", f"{MODEL}/versions/7/ready")[0] == 404
    config = json.loads(call(rest, "GET", f"{MODEL}/config")[2])
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [64, 64, 3]
    call(rest, "POST", f"{MODEL}/infer", json_infer())
    stats = json.loads(call(rest, "GET", f"{MODEL}/stats")[2])["model_stats"][0]
    assert isinstance(stats["inference_count"], int) and stats["inference_count"] >= 1
    index = json.loads(call(rest, "POST", "/v2/repository/index", {"ready": True})[2])
    assert index == [{"name": "shapes", "version": "1", "state": "READY", "reason": ""}]
    assert call(rest, "POST", "/v2/repository/models/shapes/load")[0] == 200
    status, _, body = call(rest, "POST", "/v2/repository/models/shapes/unload",
                           {"parameters": {"unload_dependents": False}})
    assert status == 400 and "remove" in json.loads(body)["error"]
    # probes need no token (kubelet's httpGet), the rest does
    assert call(rest, "GET", "/v2/health/live", auth=False)[:1] == (200,)
    assert json.loads(call(rest, "GET", "/v2/health/ready", auth=False)[2]) == {"ready": True}


def test_explain_over_rest(rest):
    """The explanation service as a POST: the ExplainRequest as proto3 JSON, the maps back."""
    encoded = base64.b64encode(cv2.imencode(".png", IMAGE[:, :, ::-1])[1].tobytes()).decode()
    status, _, body = call(rest, "POST", f"{MODEL}/explain", {
        "image": {"encoded": encoded}, "map_format": "MAP_FORMAT_FLOAT", "top_k": 2})
    assert status == 200, body[:500]
    answer = json.loads(body)
    with grpc.insecure_channel(f"127.0.0.1:{rest.port}") as channel:
        reference = xgrpc.ExplanationServiceStub(channel).Explain(xpb.ExplainRequest(
            model_name="shapes", image=xpb.Image(encoded=base64.b64decode(encoded)), top_k=2,
            map_format=xpb.MAP_FORMAT_FLOAT), metadata=(("authorization", AUTH["Authorization"]),))
    assert [m["class_id"] for m in answer["maps"]] == [m.class_id for m in reference.maps]
    assert answer["maps"][0]["method"] == "reciprocam"
    status, _, body = call(rest, "POST", f"{MODEL}/explain", {"image": {"encodd": encoded}})
    assert status == 400 and "encodd" in json.loads(body)["error"]


@pytest.mark.parametrize("body, headers, status, named", [
    (b"{not json", {}, 400, "not JSON"),
    (b"[" * 100_000, {}, 400, "not JSON"),  # nested past Python's recursion limit
    (b"[1, 2]", {}, 400, "JSON object"),
    ({"inputs": []}, {}, 400, "inputs"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64], "datatype": "UINT8",
                  "data": [0] * 64 * 64}]}, {}, 400, "inputs[0].shape"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                  "data": [300] * 64 * 64 * 3}]}, {}, 400, "0 to 255"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                  "data": [[1, 2], [3]]}]}, {}, 400, "unequal lengths"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8"}]}, {}, 400,
     "binary_data_size"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "TEXT",
                  "data": [1]}]}, {}, 400, "datatype"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"],
                  "parameters": {"content_type": "base64"}}]}, {}, 400, "base64"),
    ({"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                  "parameters": {"binary_data_size": 99}}]}, {}, 400, "binary_data_size"),
    (json_infer([{"name": "scores"}]), {}, 400, "outputs[0].name"),
    (json_infer(), {"Inference-Header-Content-Length": "x"}, 400,
     "Inference-Header-Content-Length"),
    (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "gzip"),
    (b"{}", {"Content-Encoding": "br"}, 400, "Content-Encoding"),
    (b"x" * 1_100_000, {}, 413, "max_message_bytes"),
    (gzip.compress(b" " * 1_100_000), {"Content-Encoding": "gzip"}, 413, "max_message_bytes"),
])
def test_bad_requests_are_answered_naming_the_field(rest, body, headers, status, named):
    got, reply_headers, reply = call(rest, "POST", f"{MODEL}/infer", body, headers)
    assert got == status, reply[:300]
    assert reply_headers["content-type"] == "application/json"
    assert named in json.loads(reply)["error"]
    assert call(rest, "POST", f"{MODEL}/infer", json_infer())[0] == 200  # serving on


@pytest.mark.parametrize("path", [f"{MODEL}/explain", "/v2/repository/index",
                                  "/v2/repository/models/shapes/load"])
@pytest.mark.parametrize("body", [b"\xff\xfe{}", b"{\"id\": \"\xc3\"}", b"[" * 100_000])
def test_bodies_that_are_not_json_text_are_400_on_every_endpoint(rest, path, body):
    """Bytes that are not UTF-8 were a 500 with a traceback on the endpoints that take a proto3
    JSON message (json_format raises UnicodeDecodeError, not its ParseError)."""
    status, _, reply = call(rest, "POST", path, body)
    assert status == 400, reply[:300]
    assert "JSON" in json.loads(reply)["error"]


def test_an_endless_request_head_is_cut_off(rest):
    """A header line that never ends: the server answers 400 and closes once the head passes
    64 KiB, instead of holding all of it (httptools' parser held 200 MB)."""
    connection = socket.create_connection(("127.0.0.1", rest.rest.port), timeout=30)
    connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Long: ")
    sent_mb = 0
    with pytest.raises(OSError):  # reset or broken pipe once the server has closed
        for sent_mb in range(1, 101):
            connection.sendall(b"a" * (1 << 20))
    connection.close()
    assert sent_mb < 20
    assert call(rest, "GET", "/v2/health/live")[0] == 200  # serving on


def whole_response(connection: socket.socket) -> bytes:
    """An HTTP response read off a raw socket: its head and body may come in two segments."""
    reply = b""
    while chunk := connection.recv(4096):
        reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if length is not None and len(body) >= length:
            break
    return reply


def test_connections_without_a_whole_request_head_are_closed(rest):
    """A client that connects and sends nothing, or a header line now and then, held its
    socket for ever (uvicorn times out only after a response, and each byte restarted it):
    now a request head must come whole within the keep-alive time (75 s; 1 s here)."""
    config = rest.rest.uvicorn.config
    saved, config.timeout_keep_alive = config.timeout_keep_alive, 1
    try:
        silent = socket.create_connection(("127.0.0.1", rest.rest.port), timeout=30)
        trickling = socket.create_connection(("127.0.0.1", rest.rest.port), timeout=30)
        trickling.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        started = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - started < 20:  # a header line every 0.2 s
                trickling.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
        assert silent.recv(100) == b""  # closed by the server
        kept = http.client.HTTPConnection("127.0.0.1", rest.rest.port, timeout=30)
        kept.request("GET", "/v2/health/live")  # a whole request in time is answered
        assert kept.getresponse().status == 200
        for connection in (silent, trickling, kept):
            connection.close()
    finally:
        config.timeout_keep_alive = saved
    assert call(rest, "GET", "/v2/health/live")[0] == 200


def test_a_body_that_trickles_in_is_cut_off(rest):
    """A client that sends its headers and then its body a byte now and then would hold the
    connection and its buffer for ever: after the body's time (60 s; 1 s here) it gets 408."""
    app = rest.rest.app
    app.body_seconds, saved = 1.0, app.body_seconds
    try:
        connection = socket.create_connection(("127.0.0.1", rest.rest.port), timeout=30)
        connection.sendall(f"POST {MODEL}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: "
                           f"{AUTH['Authorization']}\r\nContent-Length: 1000\r\n\r\n{{".encode())
        started = time.monotonic()
        reply = whole_response(connection)
        connection.close()
    finally:
        app.body_seconds = saved
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 1 s" in reply and time.monotonic() - started < 10


def test_unknown_paths_models_and_methods(rest):
    status, _, body = call(rest, "GET", "/v1/models/shapes")
    listed = json.loads(body)["error"]
    assert status == 404 and listed.startswith("no endpoint GET /v1/models/shapes")
    for verb, path, _ in endpoints():  # every endpoint named, the versioned ones as a rule
        assert verb in listed and path.split("/versions/")[0].replace("{name}", "NAME") in listed
    assert "/v2/models/NAME/versions/V/" in listed
    status, _, body = call(rest, "POST", "/v2/models/nonexistent/infer", json_infer())
    assert status == 404 and "'nonexistent'" in json.loads(body)["error"]
    assert "shapes" in json.loads(body)["error"]  # what is served
    status, _, body = call(rest, "GET", f"{MODEL}/infer")
    assert status == 405 and "not allowed" in json.loads(body)["error"]


def test_token_metrics_and_access_log_are_shared_with_grpc(rest):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("INFO", "json", stream=stream)
    before = scrape(rest.metrics_port)
    try:
        status, headers, body = call(rest, "POST", f"{MODEL}/infer", json_infer(), auth=False)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in json.loads(body)["error"]
        wrong = {"Authorization": "Bearer guess"}
        assert call(rest, "POST", f"{MODEL}/infer", json_infer(), wrong, auth=False)[0] == 401
        # refused before its body is read: not 413, the server holds none of it
        assert call(rest, "POST", f"{MODEL}/infer", b"x" * 1_100_000, auth=False)[0] == 401
        assert call(rest, "POST", f"{MODEL}/infer", b"x" * 1_100_000)[0] == 413  # counted too
        assert call(rest, "POST", f"{MODEL}/infer", json_infer(id="logged"),
                    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
                    )[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{rest.port}") as channel, \
                pytest.raises(grpc.RpcError):  # no token over gRPC
            kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=10)
        assert wait_until(lambda: '"logged"' in stream.getvalue(), 10)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    turned_away = [(e["method"], e["protocol"]) for e in lines
                   if e.get("code") == "UNAUTHENTICATED"]
    assert turned_away == [("ModelInfer", "http")] * 3 + [("ModelInfer", "grpc")]  # logged too
    entry = next(e for e in lines if e.get("request_id") == "logged")
    assert (entry["method"], entry["model"], entry["code"], entry["protocol"]) == \
        ("ModelInfer", "shapes", "OK", "http")
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and len(entry["token_id"]) == 8

    def counted(code: str, model: str, version: str) -> float:
        labels = dict(model=model, version=version, method="ModelInfer", code=code,
                      protocol="http")
        after = scrape(rest.metrics_port)
        return (sample(after, "xaiserve_requests", "xaiserve_requests_total", **labels)
                - before.get("xaiserve_requests", {}).get(("xaiserve_requests_total",
                                                   tuple(sorted(labels.items()))), 0))
    assert wait_until(lambda: counted("OK", "shapes", "1") == 1, 10)
    assert counted("UNAUTHENTICATED", "", "") == 3
    assert wait_until(lambda: counted("RESOURCE_EXHAUSTED", "", "") == 1, 10)


def test_a_call_over_a_limit_is_400_not_429(rest):
    """RESOURCE_EXHAUSTED over a size or count limit is an answer the same call always gets:
    400, not 429, which tells clients (and their retry policies) to try again."""
    body = {"method": "METHOD_BLACK_BOX", "black_box": {"num_masks": 60_000},
            "image": {"tensor": {"shape": [64, 64, 3],
                                 "data": base64.b64encode(IMAGE.tobytes()).decode()}}}
    status, headers, reply = call(rest, "POST", f"{MODEL}/explain", body)
    assert status == 400 and "retry-after" not in headers
    assert "black_box.num_masks 60000" in json.loads(reply)["error"]
    with grpc.insecure_channel(f"127.0.0.1:{rest.port}") as channel:  # the same over gRPC
        with pytest.raises(grpc.RpcError) as refused:
            xgrpc.ExplanationServiceStub(channel).Explain(
                json_format.ParseDict({**body, "model_name": "shapes"}, xpb.ExplainRequest()),
                metadata=(("authorization", AUTH["Authorization"]),), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == json.loads(reply)["error"]


def test_the_size_limit_holds_for_the_json_form_of_a_response(small_export, tmp_path):
    """max_message_bytes bounds what a client receives: maps as JSON numbers are several times
    their protobuf size, and a response over the limit only as JSON is refused (400, naming
    binary data), while the same maps as binary data get through."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    server = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0, rest_port=0,
                                   max_message_bytes=200_000)).start()
    flat = np.full((64, 64, 3), 128, np.uint8)  # a few hundred bytes as a PNG
    png = base64.b64encode(cv2.imencode(".png", flat)[1].tobytes()).decode()
    request = {"inputs": [{"name": "image", "shape": [32], "datatype": "BYTES",
                           "data": [png] * 32, "parameters": {"content_type": "base64"}}]}
    try:
        status, headers, body = call(server, "POST", f"{MODEL}/infer", {**request, "outputs": [
            {"name": "saliency_map", "parameters": {"binary_data": True}}]})
        assert status == 200 and len(body) < 200_000, body[:300]
        # The premise, checked rather than assumed: these maps as JSON numbers are over the limit
        # (how many digits each takes depends on the model's weights).
        maps = np.frombuffer(body[int(headers["inference-header-content-length"]):], np.float32)
        assert len(json.dumps(maps.tolist())) > 1.2 * 200_000

        status, _, body = call(server, "POST", f"{MODEL}/infer",
                               {**request, "outputs": [{"name": "saliency_map"}]})
        assert status == 400, body[:300]
        error = json.loads(body)["error"]
        assert "ModelInfer response would be" in error
        assert "over the server's max_message_bytes of 200000" in error
        assert '"binary_data": true' in error
        refused = dict(model="shapes", version="", method="ModelInfer",
                       code="RESOURCE_EXHAUSTED", protocol="http")
        assert wait_until(lambda: server.telemetry.registry.get_sample_value(
            "xaiserve_requests_total", refused) == 1, 10)  # counted as refused, not as OK
    finally:
        server.stop(grace=0)


def test_the_request_cap_is_shared_and_a_client_that_leaves_stops_its_work(rest):
    """Two slow black-box explanations over gRPC hold the server's 2 slots: a REST call is
    refused at once (429 naming the setting). A REST client that hangs up mid-explanation
    frees its slot: the masks stop, as they do for a cancelled gRPC call."""
    metadata = (("authorization", AUTH["Authorization"]),)
    with grpc.insecure_channel(f"127.0.0.1:{rest.port}") as channel:
        stub = xgrpc.ExplanationServiceStub(channel)
        slow = [stub.Explain.future(xpb.ExplainRequest(
            model_name="shapes", method=xpb.METHOD_BLACK_BOX,
            image=xpb.Image(tensor=xpb.Tensor(shape=[64, 64, 3], data=IMAGE.tobytes())),
            black_box=xpb.BlackBoxOptions(num_masks=50_000, seed=seed)), metadata=metadata,
            timeout=120) for seed in (1, 2)]
        in_flight = lambda: rest.telemetry.registry.get_sample_value(  # noqa: E731
            "xaiserve_requests_in_flight")
        assert wait_until(lambda: in_flight() == 2, 20)
        status, headers, body = call(rest, "POST", f"{MODEL}/infer", json_infer())
        assert status == 429 and "max_concurrent_requests" in json.loads(body)["error"]
        assert headers["retry-after"] == "1"
        assert not any(f.done() for f in slow)  # refused while they were in flight
        for future in slow:
            future.cancel()
    assert wait_until(lambda: in_flight() == 0, 30)

    # a REST client hangs up 0.5 s into 50 000 masks (about a minute of work)
    body = json.dumps({"method": "METHOD_BLACK_BOX", "black_box": {"num_masks": 50_000},
                       "image": {"tensor": {"shape": [64, 64, 3],
                                            "data": base64.b64encode(IMAGE.tobytes()).decode()}}
                       }).encode()
    connection = socket.create_connection(("127.0.0.1", rest.rest.port))
    connection.sendall(f"POST {MODEL}/explain HTTP/1.1\r\nHost: x\r\nAuthorization: "
                       f"{AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_until(lambda: in_flight() == 1, 20)
    time.sleep(0.5)
    connection.close()
    started = time.monotonic()
    assert wait_until(lambda: in_flight() == 0, 30)
    assert time.monotonic() - started < 15
    assert call(rest, "POST", f"{MODEL}/infer", json_infer())[0] == 200


def test_responses_are_compressed_for_clients_that_accept_it(rest):
    """Maps of 32 images (over 16 KiB) gzipped for a client that says it accepts gzip."""
    wanted, headers = binary_infer(np.stack([IMAGE] * 32), [{"name": "saliency_map"}])
    status, reply_headers, body = call(rest, "POST", f"{MODEL}/infer", wanted,
                                       {**headers, "Accept-Encoding": "gzip"})
    assert status == 200 and reply_headers["content-encoding"] == "gzip"
    _, plain_headers, plain = call(rest, "POST", f"{MODEL}/infer", wanted, headers)
    assert "content-encoding" not in plain_headers and len(body) < len(plain) / 2
    assert json.loads(gzip.decompress(body))["outputs"] == json.loads(plain)["outputs"]


def test_rest_over_tls_with_client_certificates(small_export, pki, tmp_path):  # noqa: F811
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    server = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0, rest_port=0,
                                   tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                                   tls_client_ca=pki / "ca.pem")).start()
    try:
        context = ssl.create_default_context(cafile=pki / "ca.pem")
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
        connection = http.client.HTTPSConnection("localhost", server.rest.port, context=context,
                                                 timeout=30)
        connection.request("GET", MODEL + "/ready")
        assert connection.getresponse().status == 200
        anonymous = http.client.HTTPSConnection(
            "localhost", server.rest.port, context=ssl.create_default_context(
                cafile=pki / "ca.pem"), timeout=30)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            anonymous.request("GET", MODEL + "/ready")
            anonymous.getresponse()
        plain = http.client.HTTPConnection("127.0.0.1", server.rest.port, timeout=30)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plain.request("GET", MODEL + "/ready")
            plain.getresponse()
    finally:
        server.stop(grace=0)


def test_bad_rest_port_settings_name_the_flag(small_export, tmp_path):
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    with pytest.raises(ConfigError, match="--port and --rest-port are the same port 9100"):
        Server(ServerSettings(repository=tmp_path, port=9100, rest_port=9100))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    result = run_cli("serve", "--repository", str(tmp_path), "--host", "127.0.0.1", "--port",
                     "0", "--rest-port", str(taken.getsockname()[1]))
    taken.close()
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "rest-port" in line]
    assert "cannot bind" in line


# --- fuzzed bodies: every answer is a JSON error or a result, never a crash ----------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def mostly(usual, odd) -> st.SearchStrategy:
    """Usually a right value, sometimes any JSON: requests near enough to valid to go deep."""
    return st.one_of(usual, usual, usual, odd)


@st.composite
def infer_bodies(draw) -> bytes:
    tensor = {
        "name": draw(mostly(st.just("image"), JSON_VALUES)),
        "shape": draw(mostly(st.sampled_from([[1, 64, 64, 3], [2, 64, 64, 3], [1]]),
                             st.lists(st.integers(-1, 2**63), max_size=5))),
        "datatype": draw(mostly(st.sampled_from(["UINT8", "BYTES"]),
                                st.sampled_from(["FP32", "BOOL", "INT64", ""]) | JSON_VALUES)),
        "data": draw(mostly(st.just(IMAGE.ravel().tolist()),
                            st.lists(st.integers(-3, 300), max_size=20)
                            | st.lists(st.text(max_size=6), max_size=3) | JSON_VALUES)),
        "parameters": draw(mostly(st.just({}), st.dictionaries(
            st.sampled_from(["binary_data_size", "content_type", "x"]), JSON_VALUES,
            max_size=2))),
    }
    body = {"inputs": draw(mostly(st.just([tensor]), st.just([tensor, tensor]) | JSON_VALUES)),
            "outputs": draw(mostly(st.just([{"name": "logits"}]), st.lists(st.fixed_dictionaries(
                {"name": JSON_VALUES, "parameters": st.dictionaries(
                    st.sampled_from(["classification", "binary_data"]), JSON_VALUES)}),
                max_size=2))),
            "id": draw(mostly(st.just("fuzz"), JSON_VALUES)),
            "parameters": draw(mostly(st.just({}), JSON_VALUES))}
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)
    return json.dumps(body).encode() + draw(st.binary(max_size=24))


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=infer_bodies() | st.binary(max_size=64),
       header_length=st.none() | st.integers(-2, 300).map(str)
       | st.text(alphabet="0123456789x -+.", max_size=4))
def test_fuzzed_bodies_get_well_formed_answers(rest, body, header_length):
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    status, reply_headers, reply = call(rest, "POST", f"{MODEL}/infer", body, headers)
    assert status in (200, 400, 404), reply[:300]
    if status != 200:
        assert reply_headers["content-type"] == "application/json"
        assert json.loads(reply)["error"]


def test_the_server_still_serves_after_fuzzing(rest):
    assert call(rest, "POST", f"{MODEL}/infer", json_infer())[0] == 200
