"""Triton's system shared memory extension on a real server: a client on the same host puts
its frames in a POSIX shared memory object (created here as shm_open does, a file under
/dev/shm) and gets the same answers as when it sends them in the request, over gRPC and REST;
bad regions are refused with the field and the fix, a client that shrinks its object gets an
error and not a dead server, and the extension is off unless the server is started with it.
tritonclient's shared memory utilities and perf_analyzer --shared-memory system are in
tests/test_standard_clients.py."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from xaiserve.service.config import ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc
from xaiserve.service.client import XaiClient
from xaiserve.service.server import Server
from xaiserve.service.shared_frames import SharedFrames
from xaiserve.service.shared_memory import SHM_ROOT

from tests.test_operations import IMAGE, infer_request, sample, scrape
from tests.test_rest import call

FRAMES = np.stack([IMAGE, IMAGE[::-1]])  # two 64x64 frames of the small model
LOGITS_BYTES = 2 * 3 * 4  # [2, 3] f32


@contextmanager
def shm_object(size: int):
    """A shared memory object as a camera process would create it (shm_open + ftruncate):
    yields its key and path; removed afterwards."""
    key = f"/xaiserve-test-{uuid.uuid4().hex[:12]}"
    path = SHM_ROOT / key[1:]
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(descriptor, size)
    os.close(descriptor)
    try:
        yield key, path
    finally:
        path.unlink(missing_ok=True)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size)


# a camera's frame at its own size: Explain resizes it (ModelInfer takes the model's size)
CAMERA_FRAME = cv2.resize(IMAGE, (320, 240), interpolation=cv2.INTER_NEAREST)


def serve(repo: Path, **options):
    server = Server(ServerSettings(repository=repo, host="127.0.0.1", port=0, rest_port=0,
                                   **options)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return server, channel


@pytest.fixture(scope="module")
def shared(small_export, tmp_path_factory):
    """The small model served with --shared-memory system (and a response cache, which
    requests with data in shared memory must not use)."""
    repo = tmp_path_factory.mktemp("shm")
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    server, channel = serve(repo, shared_memory="system", max_message_bytes=1024 * 1024,
                            metrics_port=0, response_cache_bytes=1024 * 1024)
    yield server, kgrpc.GRPCInferenceServiceStub(channel), xgrpc.ExplanationServiceStub(channel)
    channel.close()
    server.stop(grace=1)


@pytest.fixture
def stub(shared):
    """The server's stub, with no region left registered after each test."""
    yield shared[1]
    shared[1].SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(), timeout=30)


def register(stub, name: str, key: str, byte_size: int, offset: int = 0):
    return stub.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
        name=name, key=key, offset=offset, byte_size=byte_size), timeout=30)


def place(parameters, region: str, byte_size: int, offset: int = 0) -> None:
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def frames_request(region: str, byte_size: int = FRAMES.nbytes, offset: int = 0,
                   outputs: tuple[str, ...] = ()) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="shapes", id="shm")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(FRAMES.shape))
    place(tensor.parameters, region, byte_size, offset)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def as_array(response: kpb.ModelInferResponse, name: str, raw: bytes | None = None):
    index = [o.name for o in response.outputs].index(name)
    output = response.outputs[index]
    data = raw if raw is not None else response.raw_output_contents[index]
    return np.frombuffer(data, np.float32).reshape(list(output.shape))


def refused(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        method(request, timeout=30)
    return error.value


def test_frames_in_shared_memory_give_the_answers_of_frames_in_the_request(stub):
    """Input read at an offset inside a region that starts inside its object; both outputs
    written to another region at the offsets asked, with an empty raw entry each so that
    raw_output_contents still lines up with outputs."""
    sent = kpb.ModelInferRequest(model_name="shapes")
    sent.inputs.add(name="image", datatype="UINT8", shape=list(FRAMES.shape))
    sent.raw_input_contents.append(FRAMES.tobytes())
    sent.outputs.add(name="logits")
    sent.outputs.add(name="saliency_map")
    expected = stub.ModelInfer(sent, timeout=30)
    map_bytes = as_array(expected, "saliency_map").nbytes
    with shm_object(4096 + FRAMES.nbytes + 64) as (in_key, in_path), \
            shm_object(LOGITS_BYTES + map_bytes + 32) as (out_key, out_path):
        write_at(in_path, 4096 + 64, FRAMES.tobytes())
        register(stub, "frames", in_key, FRAMES.nbytes + 64, offset=4096)
        register(stub, "answers", out_key, LOGITS_BYTES + map_bytes + 32)
        request = frames_request("frames", offset=64)
        place(request.outputs.add(name="logits").parameters, "answers", LOGITS_BYTES, 32)
        place(request.outputs.add(name="saliency_map").parameters, "answers", map_bytes,
              32 + LOGITS_BYTES)
        response = stub.ModelInfer(request, timeout=30)
        assert list(response.raw_output_contents) == [b"", b""]
        # the frame is not in the request: asked again, it is computed again, never cached
        assert "cache_hit" not in stub.ModelInfer(request, timeout=30).parameters
        for output in response.outputs:
            assert output.parameters["shared_memory_region"].string_param == "answers"
        logits = as_array(response, "logits", read_at(out_path, 32, LOGITS_BYTES))
        maps = as_array(response, "saliency_map",
                        read_at(out_path, 32 + LOGITS_BYTES, map_bytes))
        np.testing.assert_allclose(logits, as_array(expected, "logits"), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps, as_array(expected, "saliency_map"), rtol=1e-5,
                                   atol=1e-6)
        # one output in shared memory, the other in the response: each where it was asked
        mixed = frames_request("frames", offset=64, outputs=("logits",))
        place(mixed.outputs.add(name="saliency_map").parameters, "answers", map_bytes)
        answer = stub.ModelInfer(mixed, timeout=30)
        assert answer.raw_output_contents[1] == b""
        np.testing.assert_allclose(as_array(answer, "logits"), logits, rtol=1e-5, atol=1e-6)
    metadata = stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=30)
    assert "system_shared_memory" in metadata.extensions


def regions_in_metrics(server) -> tuple[float, float]:
    families = scrape(server.metrics_port)
    return (sample(families, "xaiserve_shared_memory_regions", "xaiserve_shared_memory_regions"),
            sample(families, "xaiserve_shared_memory_bytes", "xaiserve_shared_memory_bytes"))


def test_regions_are_listed_and_unregistered_one_or_all(shared, stub):
    with shm_object(1000) as (key, _):
        register(stub, "a", key, 500)
        register(stub, "b", key, 400, offset=500)
        assert regions_in_metrics(shared[0]) == (2, 900)
        listed = stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                               timeout=30).regions
        assert {n: (r.key, r.offset, r.byte_size) for n, r in listed.items()} == {
            "a": (key, 0, 500), "b": (key, 500, 400)}
        one = stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(name="b"),
                                            timeout=30).regions
        assert list(one) == ["b"]
        error = refused(stub.SystemSharedMemoryStatus,
                        kpb.SystemSharedMemoryStatusRequest(name="c"))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "'c'" in error.details()
        unregister = stub.SystemSharedMemoryUnregister
        unregister(kpb.SystemSharedMemoryUnregisterRequest(name="a"), timeout=30)
        unregister(kpb.SystemSharedMemoryUnregisterRequest(name="a"), timeout=30)  # no error
        assert list(stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                                  timeout=30).regions) == ["b"]
        unregister(kpb.SystemSharedMemoryUnregisterRequest(), timeout=30)
        assert not stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                                 timeout=30).regions
        assert regions_in_metrics(shared[0]) == (0, 0)


BAD_REGISTRATIONS = [  # (name, key, offset, byte_size) -> code, words in the message
    (("", "KEY", 0, 10), grpc.StatusCode.INVALID_ARGUMENT, "name: empty"),
    (("r", "KEY", 0, 0), grpc.StatusCode.INVALID_ARGUMENT, "byte_size 0"),
    (("r", "/xaiserve-test-missing", 0, 10), grpc.StatusCode.INVALID_ARGUMENT,
     "no shared memory object"),
    (("r", "/../etc/passwd", 0, 10), grpc.StatusCode.INVALID_ARGUMENT, "no other slash"),
    (("r", "KEY", 4000, 200), grpc.StatusCode.INVALID_ARGUMENT, "past the end"),
    (("taken", "KEY", 0, 10), grpc.StatusCode.ALREADY_EXISTS, "unregister it first"),
]


@pytest.mark.parametrize("given, code, words", BAD_REGISTRATIONS)
def test_bad_registrations_are_refused_with_the_fix(stub, given, code, words):
    with shm_object(4096) as (key, _):
        register(stub, "taken", key, 10)
        name, given_key, offset, byte_size = given
        error = refused(stub.SystemSharedMemoryRegister, kpb.SystemSharedMemoryRegisterRequest(
            name=name, key=key if given_key == "KEY" else given_key, offset=offset,
            byte_size=byte_size))
        assert error.code() == code and words in error.details(), error.details()
        assert list(stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                                  timeout=30).regions) == ["taken"]


def _unknown_region(request):
    request.inputs[0].parameters["shared_memory_region"].string_param = "nowhere"


def _past_the_region(request):
    request.inputs[0].parameters["shared_memory_offset"].int64_param = 100


def _wrong_size(request):
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = FRAMES.nbytes - 3


def _no_size(request):
    del request.inputs[0].parameters["shared_memory_byte_size"]


def _both_ways(request):
    request.raw_input_contents.append(FRAMES.tobytes())


def _small_output(request):
    place(request.outputs.add(name="logits").parameters, "frames", LOGITS_BYTES - 4)


def _classified_output(request):
    output = request.outputs.add(name="logits")
    output.parameters["classification"].int64_param = 2
    place(output.parameters, "frames", LOGITS_BYTES)


def _offset_alone(request):
    request.outputs.add(name="logits").parameters["shared_memory_offset"].int64_param = 8


BAD_REQUESTS = [
    (_unknown_region, "inputs[0]: region 'nowhere' is not registered"),
    (_past_the_region, "run past region 'frames'"),
    (_wrong_size, f"inputs[0]: {FRAMES.nbytes - 3} values for shape [2, 64, 64, 3]"),
    (_no_size, "inputs[0].parameters.shared_memory_byte_size: missing"),
    (_both_ways, "values in the request and in shared memory"),
    (_small_output, f"outputs[0]: the output takes {LOGITS_BYTES} bytes, more than the "
                    f"{LOGITS_BYTES - 4} given"),
    (_classified_output, "outputs[0]: classification and shared memory"),
    (_offset_alone, "outputs[0].parameters.shared_memory_offset without shared_memory_region"),
]


@pytest.mark.parametrize("spoil, words", BAD_REQUESTS, ids=[f.__name__ for f, _ in BAD_REQUESTS])
def test_bad_places_are_refused_with_the_field_and_the_server_goes_on(stub, spoil, words):
    with shm_object(FRAMES.nbytes) as (key, path):
        write_at(path, 0, FRAMES.tobytes())
        register(stub, "frames", key, FRAMES.nbytes)
        request = frames_request("frames")
        spoil(request)
        error = refused(stub.ModelInfer, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert words in error.details(), error.details()
        assert stub.ModelInfer(frames_request("frames"), timeout=30).outputs[0].shape == [2, 3]


def test_an_object_shrunk_after_registration_is_an_error_not_a_crash(stub):
    """A mapped region read past its object's end kills the process (SIGBUS); the server
    reads and writes with pread and pwrite, so the caller gets an error and nothing else
    happens."""
    with shm_object(FRAMES.nbytes + LOGITS_BYTES) as (key, path):
        write_at(path, 0, FRAMES.tobytes())
        register(stub, "frames", key, FRAMES.nbytes)
        register(stub, "answers", key, LOGITS_BYTES, offset=FRAMES.nbytes)
        request = frames_request("frames")
        place(request.outputs.add(name="logits").parameters, "answers", LOGITS_BYTES)
        assert stub.ModelInfer(request, timeout=30).raw_output_contents == [b""]
        os.truncate(path, FRAMES.nbytes + 4)  # the output no longer fits
        error = refused(stub.ModelInfer, request)
        assert "was shrunk after it was registered" in error.details()
        assert path.stat().st_size == FRAMES.nbytes + 4  # never grown by the server
        os.truncate(path, 100)  # the input no longer fits
        error = refused(stub.ModelInfer, frames_request("frames"))
        assert "'frames' ends early" in error.details()
    assert stub.ModelInfer(infer_request(), timeout=30).outputs[0].shape == [1, 3]


def test_regions_unregistered_while_requests_read_them(stub):
    """A region is never closed under a request reading it: each answer is whole or a clear
    refusal, and the server goes on."""
    with shm_object(FRAMES.nbytes) as (key, path):
        write_at(path, 0, FRAMES.tobytes())
        register(stub, "frames", key, FRAMES.nbytes)
        codes: list[grpc.StatusCode] = []

        def send():
            for _ in range(20):
                try:
                    stub.ModelInfer(frames_request("frames"), timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    assert "'frames' is not registered" in error.details(), error.details()
                    codes.append(error.code())
        senders = [threading.Thread(target=send) for _ in range(3)]
        for thread in senders:
            thread.start()
        for _ in range(20):
            stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(
                name="frames"), timeout=30)
            register(stub, "frames", key, FRAMES.nbytes)
        for thread in senders:
            thread.join()
        assert len(codes) == 60 and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def explain(image: xpb.Image) -> xpb.ExplainRequest:
    return xpb.ExplainRequest(model_name="shapes", image=image, top_k=2,
                              map_format=xpb.MAP_FORMAT_FLOAT)


def explained(response: xpb.ExplainResponse) -> tuple:
    """What a client reads: the classes, scores and maps."""
    return ([(p.class_id, round(p.score, 5)) for p in response.predictions],
            [(m.class_id, list(m.shape), np.round(m.values, 5).tolist()) for m in response.maps])


def test_explain_reads_frames_and_encoded_images_from_shared_memory(shared, stub):
    """A frame at the camera's size, and a JPEG, each explained from a region as from the
    request."""
    explainer = shared[2]
    ok, jpeg = cv2.imencode(".jpg", CAMERA_FRAME)
    jpeg = jpeg.tobytes()
    with shm_object(CAMERA_FRAME.nbytes + len(jpeg)) as (key, path):
        write_at(path, 0, CAMERA_FRAME.tobytes())
        write_at(path, CAMERA_FRAME.nbytes, jpeg)
        register(stub, "camera", key, CAMERA_FRAME.nbytes + len(jpeg))
        from_region = explainer.Explain(explain(xpb.Image(shared_memory=xpb.SharedImage(
            region="camera", byte_size=CAMERA_FRAME.nbytes, shape=[240, 320, 3]))), timeout=30)
        sent = explainer.Explain(explain(xpb.Image(tensor=xpb.Tensor(
            shape=[240, 320, 3], data=CAMERA_FRAME.tobytes()))), timeout=30)
        assert explained(from_region) == explained(sent)
        assert "inference" in explainer.Explain(explain(xpb.Image(shared_memory=xpb.SharedImage(
            region="camera", byte_size=CAMERA_FRAME.nbytes, shape=[240, 320, 3]))),
            timeout=30).timings_ms  # computed again, not cached
        assert len(from_region.maps) == 2
        encoded = explainer.Explain(explain(xpb.Image(shared_memory=xpb.SharedImage(
            region="camera", offset=CAMERA_FRAME.nbytes, byte_size=len(jpeg)))), timeout=30)
        assert explained(encoded) == explained(explainer.Explain(
            explain(xpb.Image(encoded=jpeg)), timeout=30))
        for image, code, words in [
            (xpb.SharedImage(region="elsewhere", byte_size=10, shape=[1, 1, 3]),
             grpc.StatusCode.INVALID_ARGUMENT,
             "image.shared_memory: region 'elsewhere' is not registered"),
            (xpb.SharedImage(region="camera", byte_size=CAMERA_FRAME.nbytes, shape=[240, 300, 3]),
             grpc.StatusCode.INVALID_ARGUMENT,
             f"image.shared_memory.byte_size: {CAMERA_FRAME.nbytes} bytes for shape"),
            (xpb.SharedImage(region="camera", byte_size=100), grpc.StatusCode.INVALID_ARGUMENT,
             "image.shared_memory: "),  # not an image
            (xpb.SharedImage(region="camera", byte_size=2 * 1024 * 1024, shape=[1024, 683, 3]),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "over the server's max_message_bytes"),
        ]:
            error = refused(explainer.Explain, explain(xpb.Image(shared_memory=image)))
            assert error.code() == code and words in error.details(), error.details()


def test_a_camera_process_sends_frames_through_shared_frames(shared, stub):
    """The library's client side: frames written to slots in turn, each explained as the
    same frame sent in the request; the region and the object gone after."""
    server = shared[0]
    client = XaiClient(f"127.0.0.1:{server.port}")
    frames = [CAMERA_FRAME, CAMERA_FRAME[::-1].copy(), CAMERA_FRAME[:, ::-1].copy()]
    try:
        with SharedFrames(client.channel, CAMERA_FRAME.shape, slots=2) as shared_frames:
            path = shared_frames.path
            assert path.stat().st_size == 2 * CAMERA_FRAME.nbytes
            answers = [client.explain(shared_frames.put(f), "shapes", top_k=2,
                                      map_format="float") for f in frames]
            with pytest.raises(ValueError, match="uint8"):
                shared_frames.put(CAMERA_FRAME.astype(np.float32))
        assert not path.exists()
        assert not server.shared_memory.status("")
        for frame, answer in zip(frames, answers):
            sent = client.explain(xpb.Image(tensor=xpb.Tensor(shape=frame.shape,
                                                              data=frame.tobytes())),
                                  "shapes", top_k=2, map_format="float")
            assert explained(answer) == explained(sent)
    finally:
        client.close()


def test_shared_memory_over_rest_as_triton_s_paths(shared, stub):
    server = shared[0]
    with shm_object(FRAMES.nbytes + LOGITS_BYTES) as (key, path):
        write_at(path, 0, FRAMES.tobytes())
        for name, offset, size in (("frames", 0, FRAMES.nbytes),
                                   ("answers", FRAMES.nbytes, LOGITS_BYTES)):
            status, _, body = call(server, "POST",
                                   f"/v2/systemsharedmemory/region/{name}/register",
                                   {"key": key, "offset": offset, "byte_size": size})
            assert status == 200, body
        status, _, body = call(server, "GET", "/v2/systemsharedmemory/status")
        assert status == 200 and sorted(r["name"] for r in json.loads(body)) == [
            "answers", "frames"]
        status, _, body = call(server, "GET", "/v2/systemsharedmemory/region/none/status")
        assert status == 404 and b"'none'" in body
        status, _, body = call(server, "POST", "/v2/models/shapes/infer", {
            "inputs": [{"name": "image", "shape": list(FRAMES.shape), "datatype": "UINT8",
                        "parameters": {"shared_memory_region": "frames",
                                       "shared_memory_byte_size": FRAMES.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {
                "shared_memory_region": "answers", "shared_memory_byte_size": LOGITS_BYTES}}]})
        assert status == 200, body
        (output,) = json.loads(body)["outputs"]
        assert output == {"name": "logits", "datatype": "FP32", "shape": [2, 3]}  # as Triton's
        logits = np.frombuffer(read_at(path, FRAMES.nbytes, LOGITS_BYTES), np.float32)
        expected = as_array(stub.ModelInfer(frames_request("frames"), timeout=30), "logits")
        np.testing.assert_allclose(logits.reshape(2, 3), expected, rtol=1e-5, atol=1e-6)
        # Explain's image from a region too, in the ExplainRequest's proto3 JSON
        status, _, body = call(server, "POST", "/v2/models/shapes/explain", {
            "image": {"shared_memory": {"region": "frames", "byte_size": IMAGE.nbytes,
                                        "shape": [64, 64, 3]}}, "map_format": "MAP_FORMAT_FLOAT"})
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["class_id"] == int(expected[0].argmax())
        status, _, _ = call(server, "POST", "/v2/systemsharedmemory/unregister")
        assert status == 200
        assert json.loads(call(server, "GET", "/v2/systemsharedmemory/status")[2]) == []


def test_shared_memory_is_off_unless_the_server_is_started_with_it(small_export, tmp_path):
    shutil.copytree(small_export.path, tmp_path / "shapes" / "1")
    server, channel = serve(tmp_path)
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    try:
        with shm_object(FRAMES.nbytes) as (key, _):
            error = refused(stub.SystemSharedMemoryRegister, kpb.SystemSharedMemoryRegisterRequest(
                name="frames", key=key, byte_size=FRAMES.nbytes))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "start it with --shared-memory system" in error.details()
            error = refused(stub.ModelInfer, frames_request("frames"))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            error = refused(xgrpc.ExplanationServiceStub(channel).Explain, explain(xpb.Image(
                shared_memory=xpb.SharedImage(region="frames", byte_size=FRAMES.nbytes))))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        metadata = stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=30)
        assert "system_shared_memory" not in metadata.extensions
        assert stub.ModelInfer(infer_request(), timeout=30).outputs[0].shape == [1, 3]
    finally:
        channel.close()
        server.stop(grace=1)
