"""KServe v2 / Open Inference Protocol servicer: standard clients work unchanged."""

from __future__ import annotations

import struct
import time

import numpy as np

from . import __version__
from .errors import invalid, rpc, unavailable
from .images import ImageError, decode_image, resize_for_model
from .model import SALIENCY_OUTPUT
from .proto import grpc_predict_v2_pb2 as pb
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc
from .repository import ModelRepository, VersionState

SCORES_OUTPUT = "logits"


def served_version(repository: ModelRepository, name: str, version: str) -> VersionState:
    state = repository.state(name, version)
    if not state.ready:
        reason = state.error or "still loading"
        raise unavailable(f"model {name!r} version {state.version} is not ready: {reason}")
    return state


def split_bytes_tensor(raw: bytes) -> list[bytes]:
    """KServe BYTES serialisation: each element is a 4-byte little-endian length + payload."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid("raw_input_contents[0]: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise invalid("raw_input_contents[0]: BYTES element longer than the buffer")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def decode_input(request: pb.ModelInferRequest, state: VersionState) -> np.ndarray:
    """The request's single input -> u8 [N, H, W, 3] at the model's size."""
    info = state.model.info
    if len(request.inputs) != 1:
        raise invalid(f"inputs: {len(request.inputs)} given; send exactly one image input")
    tensor = request.inputs[0]
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    shape = list(tensor.shape)
    if tensor.datatype == "UINT8":
        expected = [info.input_height, info.input_width, 3]
        if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
            raise invalid(f"inputs[0].shape {shape}: expected [N, {expected[0]}, {expected[1]}, 3]"
                          " (u8 RGB at the model's size), or send BYTES with encoded images")
        count = int(np.prod(shape))
        if raw is not None:
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
            if data.size and data.max() > 255:
                raise invalid("inputs[0].contents.uint_contents: values over 255 in a UINT8 tensor")
            data = data.astype(np.uint8)
        if data.size != count:
            raise invalid(f"inputs[0]: {data.size} values for shape {shape} ({count} expected)")
        return data.reshape(shape)
    if tensor.datatype == "BYTES":
        items = split_bytes_tensor(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if not items or (shape and int(np.prod(shape)) != len(items)):
            raise invalid(f"inputs[0]: {len(items)} encoded images for shape {shape}")
        images = []
        for i, item in enumerate(items):
            try:
                images.append(resize_for_model(decode_image(item), info))
            except ImageError as exc:
                raise invalid(f"inputs[0] element {i}: {exc}") from None
        return np.stack(images)
    raise invalid(f"inputs[0].datatype {tensor.datatype!r}: send UINT8 [N, H, W, 3] or BYTES "
                  "(encoded JPEG/PNG images)")


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    @rpc
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.all_ready())

    @rpc
    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.repository.state(request.name,
                                                                 request.version).ready)

    @rpc
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="xaiserve", version=__version__, extensions=[])

    @rpc
    def ModelMetadata(self, request, context):
        state = served_version(self.repository, request.name, request.version)
        model = state.model
        tensors = [pb.ModelMetadataResponse.TensorMetadata(
            name=SCORES_OUTPUT, datatype="FP32", shape=[-1, len(model.info.labels)])]
        if model.has_saliency:
            shape = model.compiled.output(SALIENCY_OUTPUT).get_partial_shape()
            tensors.append(pb.ModelMetadataResponse.TensorMetadata(
                name=SALIENCY_OUTPUT, datatype="FP32",
                shape=[d.get_length() if d.is_static else -1 for d in shape]))
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in self.repository.versions(request.name)],
            platform="openvino_ir",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name="image", datatype="UINT8",
                shape=[-1, model.info.input_height, model.info.input_width, 3])],
            outputs=tensors)

    @rpc
    def ModelInfer(self, request, context):
        started = time.perf_counter()
        state = served_version(self.repository, request.model_name, request.model_version)
        model = state.model
        batch = decode_input(request, state)
        timings = {"decode": (time.perf_counter() - started) * 1e3}
        wanted = [o.name for o in request.outputs] or [SCORES_OUTPUT]
        available = {SCORES_OUTPUT} | ({SALIENCY_OUTPUT} if model.has_saliency else set())
        for i, name in enumerate(wanted):
            if name not in available:
                raise invalid(f"outputs[{i}].name {name!r}: this model has {sorted(available)}")
        results = model.predict(batch, tuple(wanted), timings)
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=str(state.version), id=request.id)
        for name in wanted:
            array = np.ascontiguousarray(results[name], dtype=np.float32)
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        timings["total"] = (time.perf_counter() - started) * 1e3
        for stage, ms in timings.items():  # the server's split of this request, in ms
            response.parameters[f"{stage}_ms"].double_param = ms
        return response
