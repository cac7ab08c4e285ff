"""ModelStreamInfer, Triton's streaming extension, against a running server: a device's frames
over one stream, each answered in order like a ModelInfer, a bad frame answered with its error
while the stream goes on, answers sent while the client waits for them, every message counted
and capped like a call, open streams capped and released when their clients leave."""

from __future__ import annotations

import json
import queue
import shutil
import time

import cv2
import grpc
import numpy as np
import pytest

from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.server import Server

from .test_operations import calls_counted, infer_request, sample, scrape, wait_until

MODEL = "efficientnet_lite0"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def pixels_request(image: np.ndarray, request_id: str, outputs=("logits",),
                   model: str = MODEL) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="image", datatype="UINT8", shape=[1, *image.shape])
    request.raw_input_contents.append(np.ascontiguousarray(image).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def encoded(image: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, data = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def jpeg_request(image: np.ndarray, request_id: str) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=MODEL, id=request_id)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(encoded(image))
    return request


def output(response: kpb.ModelInferResponse, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(shape)


def held_open(stub) -> tuple[queue.Queue, object]:
    """A stream whose client sends when told (None: closes its side)."""
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (request := outbox.get(timeout=60)) is not None:
            yield request

    return outbox, stub.ModelStreamInfer(requests(), timeout=120)


@pytest.fixture(scope="module")
def frames(photos) -> dict[str, np.ndarray]:
    return {name: cv2.resize(photos[name], (224, 224), interpolation=cv2.INTER_AREA)
            for name in ("chelsea", "coffee")}


def test_a_stream_answers_each_frame_in_order_and_goes_on_after_bad_ones(server, kserve,
                                                                           frames, photos):
    requests = [pixels_request(frames["chelsea"], "f0"),
                jpeg_request(photos["coffee"], "f1"),
                pixels_request(frames["chelsea"][:100], "f2"),  # a wrong shape
                pixels_request(frames["coffee"], "f3", model="nonexistent"),
                pixels_request(frames["coffee"], "f4", outputs=("logits", "saliency_map")),
                pixels_request(frames["chelsea"], "f5", outputs=("heatmap",))]
    answers = list(kserve.ModelStreamInfer(iter(requests), timeout=120))
    assert [a.infer_response.id for a in answers] == ["f0", "f1", "f2", "f3", "f4", "f5"]
    ok = [not a.error_message for a in answers]
    assert ok == [True, True, False, False, True, False]
    assert int(output(answers[0].infer_response, "logits").argmax()) == 285  # Egyptian cat
    assert int(output(answers[1].infer_response, "logits").argmax()) == 967  # espresso
    assert int(output(answers[4].infer_response, "logits").argmax()) == 967
    assert output(answers[4].infer_response, "saliency_map").shape == (1, 1000, 7, 7)
    assert answers[0].infer_response.model_version == "1"
    assert answers[2].error_message.startswith("INVALID_ARGUMENT: inputs[0].shape [1, 100, 224")
    assert answers[2].infer_response.model_name == MODEL
    assert answers[3].error_message.startswith("NOT_FOUND: ")
    assert MODEL in answers[3].error_message  # what is served, named
    assert answers[5].error_message.startswith("INVALID_ARGUMENT: outputs[0].name 'heatmap'")
    # the same frame as a unary call: the same class and scores
    unary = output(kserve.ModelInfer(requests[0], timeout=60), "logits")
    streamed = output(answers[0].infer_response, "logits")
    np.testing.assert_allclose(streamed, unary, atol=0.05 * np.abs(unary).max())
    # the server's split of each answered frame, as ModelInfer gives it
    assert answers[0].infer_response.parameters["inference_ms"].double_param > 0
    # and the server goes on serving unary calls
    assert int(output(kserve.ModelInfer(requests[1], timeout=60), "logits").argmax()) == 967


def test_answers_go_out_while_the_client_waits_for_them(server, kserve, frames):
    """A device that sends its next frame only once the last one is answered: the server must
    answer while it waits for the next request, not after."""
    images = [frames["chelsea"], frames["coffee"]] * 3
    outbox, stream = held_open(kserve)
    outbox.put(pixels_request(images[0], "0"))
    classes = []
    for i in range(len(images)):
        answer = next(stream)
        assert answer.infer_response.id == str(i) and not answer.error_message
        classes.append(int(output(answer.infer_response, "logits").argmax()))
        outbox.put(pixels_request(images[i + 1], str(i + 1)) if i + 1 < len(images) else None)
    assert classes == [285, 967] * 3
    assert list(stream) == []  # the client closed its side: the stream ends OK


def test_a_message_that_is_not_protobuf_is_answered_and_the_stream_goes_on(server, channel,
                                                                          frames):
    raw_stream = channel.stream_stream(
        STREAM, request_serializer=None,
        response_deserializer=kpb.ModelStreamInferResponse.FromString)
    good = pixels_request(frames["chelsea"], "after").SerializeToString()
    answers = list(raw_stream(iter([b"\xff\xff\xff", good]), timeout=60))
    assert answers[0].error_message.startswith(
        "INVALID_ARGUMENT: a ModelStreamInfer message is not a valid protobuf message")
    assert answers[1].infer_response.id == "after" and not answers[1].error_message
    assert int(output(answers[1].infer_response, "logits").argmax()) == 285


# --- caps, cancellation, metrics: a server of the small model with one stream at a time ---

@pytest.fixture(scope="module")
def one_stream(small_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("streams")
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0, metrics_port=0,
                              poll_seconds=0.5, max_open_streams=1,
                              defaults=ModelSettings(max_requests_in_flight=2))
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, kgrpc.GRPCInferenceServiceStub(channel)
    channel.close()
    server.stop(grace=2)


def test_open_streams_are_capped_and_a_stream_cancelled_gives_its_place_back(one_stream):
    server, stub = one_stream
    outbox, first = held_open(stub)
    outbox.put(infer_request(request_id="a"))
    assert next(first).infer_response.id == "a"
    with pytest.raises(grpc.RpcError) as refused:  # the cap: one open stream
        list(stub.ModelStreamInfer(iter([infer_request()]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 1 open streams" in refused.value.details()
    assert "retry later" in refused.value.details()
    assert stub.ModelInfer(infer_request(request_id="unary"), timeout=30).id == "unary"
    families = scrape(server.metrics_port)
    assert sample(families, "xaiserve_open_streams", "xaiserve_open_streams") == 1
    first.cancel()  # the device goes away without closing its side
    # its place is given back once gRPC has ended the call
    assert wait_until(lambda: opens(stub), timeout=30)
    assert wait_until(lambda: sample(scrape(server.metrics_port), "xaiserve_open_streams",
                                     "xaiserve_open_streams") == 0, timeout=10)


def test_a_stream_cancelled_before_its_first_frame_gives_its_place_back(one_stream):
    server, stub = one_stream
    outbox, idle = held_open(stub)
    assert wait_until(lambda: sample(scrape(server.metrics_port), "xaiserve_open_streams",
                                     "xaiserve_open_streams") == 1, timeout=10)
    idle.cancel()
    assert wait_until(lambda: opens(stub), timeout=30)
    outbox.put(None)


def opens(stub) -> bool:
    try:
        answers = list(stub.ModelStreamInfer(iter([infer_request(request_id="b")]), timeout=30))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
    return [a.infer_response.id for a in answers] == ["b"]


def test_each_message_is_counted_and_capped_like_a_call(one_stream):
    """A stream's messages count one by one in the metrics (method ModelStreamInfer), and a
    model's cap on requests in flight applies to them: a client that sends faster than the
    model's cap gets 'retry later' for those frames, not a stalled stream."""
    server, stub = one_stream
    calls_before = calls_counted(server.metrics_port)

    def counted(code: str) -> float:
        families = scrape(server.metrics_port)
        labels = dict(model="shapes", version="1" if code == "OK" else "",
                      method="ModelStreamInfer", code=code, protocol="grpc")
        try:
            return sample(families, "xaiserve_requests", "xaiserve_requests_total", **labels)
        except KeyError:
            return 0.0

    ok_before = counted("OK")
    answers = list(stub.ModelStreamInfer(iter(
        [infer_request(request_id=str(i)) for i in range(40)]), timeout=120))
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(40)]
    refused = [a for a in answers if a.error_message]
    for answer in refused:
        assert answer.error_message.startswith("RESOURCE_EXHAUSTED: model 'shapes' is "
                                               "handling its maximum of 2")
        assert answer.error_message.endswith("retry later")
    served = len(answers) - len(refused)
    assert served >= 2
    assert wait_until(lambda: counted("OK") == ok_before + served, timeout=10)
    if refused:
        assert wait_until(lambda: counted("RESOURCE_EXHAUSTED") >= len(refused), timeout=10)
    assert calls_counted(server.metrics_port) >= calls_before + 40


@pytest.fixture(scope="module")
def token_server(small_export, tmp_path_factory):
    """The small model on a server that asks for a token."""
    folder = tmp_path_factory.mktemp("token")
    shutil.copytree(small_export.path, folder / "repo" / "shapes" / "1")
    (folder / "token").write_text("s3cret\n")
    server = Server(ServerSettings(repository=folder / "repo", host="127.0.0.1", port=0,
                                   token_file=folder / "token")).start()
    yield server
    server.stop(grace=1)


def test_a_stream_without_the_token_is_refused(token_server):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ModelStreamInfer(iter([infer_request()]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ModelStreamInfer(
            iter([infer_request(request_id="t")]), timeout=30,
            metadata=[("authorization", "Bearer s3cret")]))
        assert [a.infer_response.id for a in answers] == ["t"]
        assert not answers[0].error_message


# --- ExplainStream: the explanation service over one stream ---------------------------------

def test_explain_stream_answers_each_image_in_order_as_explain_does(server, client, photos):
    requests = [
        client.request(encoded(photos["chelsea"]), MODEL, map_format="float"),
        client.request(b"not an image", MODEL),
        client.request(encoded(photos["coffee"]), "plain", method="black-box", num_masks=200,
                       seed=3, map_format="float"),  # RISE: the plain IR has no map output
        client.request(encoded(photos["coffee"]), MODEL, targets=[5000]),
        client.request(encoded(photos["coffee"]), MODEL),
    ]
    for i, request in enumerate(requests):
        request.id = f"e{i}"
    answers = list(client.explain_stream(requests))
    assert [a.id for a in answers] == ["e0", "e1", "e2", "e3", "e4"]
    assert [a.error_code for a in answers] == ["", "INVALID_ARGUMENT", "", "INVALID_ARGUMENT", ""]
    assert answers[0].response.predictions[0].class_id == 285
    assert answers[0].response.maps[0].method == "reciprocam"
    assert answers[1].error_message.startswith("image")
    assert answers[2].response.predictions[0].class_id == 967
    assert answers[2].response.maps[0].method == "rise"
    assert "target_classes" in answers[3].error_message
    assert answers[4].response.maps[0].data[:8] == b"\x89PNG\r\n\x1a\n"  # the default overlay
    # the same request as a unary Explain: the same prediction and map
    unary = client.stub.Explain(requests[0], timeout=60)
    streamed = answers[0].response
    assert unary.predictions[0].class_id == streamed.predictions[0].class_id
    first = np.array(unary.maps[0].values)
    assert first.size == 7 * 7
    np.testing.assert_allclose(streamed.maps[0].values, first, atol=0.05 * np.abs(first).max())
    rise = client.stub.Explain(requests[2], timeout=120)  # the same seed: the same map
    assert len(rise.maps[0].values) > 0
    np.testing.assert_allclose(answers[2].response.maps[0].values, rise.maps[0].values,
                               rtol=1e-4, atol=1e-6)


def test_cli_explain_stream_writes_each_image_and_names_the_one_that_failed(server, photos,
                                                                          tmp_path):
    from .conftest import run_cli

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_cat.jpg").write_bytes(encoded(photos["chelsea"]))
    (folder / "b_broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (folder / "c_cup.png").write_bytes(encoded(photos["coffee"], ".png"))
    images = [str(folder / name) for name in ("a_cat.jpg", "b_broken.jpg", "c_cup.png")]
    out = tmp_path / "out"
    result = run_cli("explain", *images, "--server", f"127.0.0.1:{server.port}", "--model",
                     MODEL, "--stream", "--out", str(out))
    assert result.returncode == 1, result.stderr  # one image failed
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "b_broken.jpg: INVALID_ARGUMENT: image" in errors[0], errors
    assert json.loads((out / "a_cat.json").read_text())["predictions"][0]["class_id"] == 285
    assert json.loads((out / "c_cup.json").read_text())["predictions"][0]["class_id"] == 967
    assert (out / "c_cup_overlay.png").stat().st_size > 0
    assert not (out / "b_broken.json").exists()
    lines = [line for line in result.stdout.splitlines() if line.endswith("ms]")]
    assert [line.split(":")[0] for line in lines] == ["a_cat.jpg", "c_cup.png"]


def test_cli_explain_stream_needs_a_server(photos, tmp_path):
    from .conftest import run_cli

    image = tmp_path / "a.jpg"
    image.write_bytes(encoded(photos["chelsea"]))
    result = run_cli("explain", str(image), "--model-path", str(tmp_path), "--stream")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--stream needs --server: it sends the images over one ExplainStream")


def test_a_stream_of_explanations_carries_the_clients_token(token_server):
    """XaiClient's token goes on streams too (its channel interceptor)."""
    from xaiserve.service.client import XaiClient

    address = f"127.0.0.1:{token_server.port}"
    image = encoded(np.full((64, 64, 3), 128, np.uint8), ".png")
    with_token = XaiClient(address, token="s3cret")
    answers = list(with_token.explain_stream([with_token.request(image, "shapes")] * 2))
    assert [a.error_code for a in answers] == ["", ""]
    assert answers[0].response.model_name == "shapes"
    with_token.close()
    without = XaiClient(address)
    with pytest.raises(grpc.RpcError) as refused:
        list(without.explain_stream([without.request(image, "shapes")]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    without.close()


def test_a_shutdown_ends_open_streams_after_the_grace(small_export, tmp_path):
    """A rolling update with cameras connected: stop() ends the streams once the grace is
    over (the devices open theirs again elsewhere) and returns, instead of waiting for
    clients that never close their side."""
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    server = Server(ServerSettings(repository=tmp_path, host="127.0.0.1", port=0)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    outbox, stream = held_open(kgrpc.GRPCInferenceServiceStub(channel))
    outbox.put(infer_request(request_id="before"))
    assert next(stream).infer_response.id == "before"
    started = time.monotonic()
    server.stop(grace=1)
    assert time.monotonic() - started < 10
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    outbox.put(None)
    channel.close()
