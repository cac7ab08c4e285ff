"""KServe v2 / Open Inference Protocol servicer: standard clients work unchanged."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from . import __version__
from .errors import NotServed, RequestError, invalid, rpc, shown, unavailable
from .images import ImageError, decode_image, resize_for_model
from .message_stream import CallerStream, MessageStreams, StreamAnswers
from .model import SALIENCY_OUTPUT, ClassifierModel
from .proto import grpc_predict_v2_pb2 as pb
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc
from .repository import ModelRepository, VersionState
from .response_cache import CachedAnswers, ResponseCache
from .shared_memory import (BYTE_SIZE, REGION, RegionStatus, SharedMemoryRegions, TensorPlace,
                            tensor_place)

SCORES_OUTPUT = "logits"
INPUT_NAME = "image"
PLATFORM = "openvino_ir"
# Triton's names for the protocol extensions this server answers (ModelConfig, ModelStatistics);
# clients such as perf_analyzer look for them before they call those RPCs.
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "classification")
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # listed while it is on
# RepositoryModelLoad without a deadline waits this long for a compile at most
LOAD_WAIT_SECONDS = 600.0
TRITON_TYPES = {"UINT8": pb.TYPE_UINT8, "FP32": pb.TYPE_FP32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe's name: UINT8, FP32
    shape: list[int]  # with the batch dimension first, -1 where it varies


def served_tensors(model: ClassifierModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What ModelInfer takes and gives for this model, for ModelMetadata and ModelConfig.
    (BYTES with encoded images is accepted too: KServe metadata has one datatype per input.)"""
    info = model.info
    inputs = [TensorSpec(INPUT_NAME, "UINT8", [-1, info.input_height, info.input_width, 3])]
    outputs = [TensorSpec(SCORES_OUTPUT, "FP32", [-1, len(info.labels)])]
    if model.has_saliency:
        shape = model.compiled.output(SALIENCY_OUTPUT).get_partial_shape()
        outputs.append(TensorSpec(SALIENCY_OUTPUT, "FP32",
                                  [d.get_length() if d.is_static else -1 for d in shape]))
    return inputs, outputs


def served_version(repository: ModelRepository, name: str, version: str) -> VersionState:
    state = repository.state(name, version)
    if not state.ready:
        reason = state.error or "still loading"
        raise unavailable(f"model {name!r} version {state.version} is not ready: {reason}")
    return state


def split_bytes_tensor(raw: bytes, max_items: int) -> list[bytes]:
    """KServe BYTES serialisation: each element is a 4-byte little-endian length + payload.
    More than `max_items` elements are refused as soon as they are counted."""
    items, offset = [], 0
    while offset < len(raw):
        if len(items) == max_items:
            check_batch(max_items + 1, max_items)
        if offset + 4 > len(raw):
            raise invalid("raw_input_contents[0]: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise invalid("raw_input_contents[0]: BYTES element longer than the buffer")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def input_bytes(request: pb.ModelInferRequest, shared: SharedMemoryRegions) -> bytes | None:
    """The input's raw bytes: from raw_input_contents, or from the shared memory region its
    parameters name; None when its values are in its typed contents."""
    if len(request.raw_input_contents) > 1:  # the protocol: one per input, in their order
        raise invalid(f"raw_input_contents: {len(request.raw_input_contents)} given for 1 "
                      "input; send one")
    tensor = request.inputs[0]
    place = tensor_place(tensor.parameters, "inputs[0]")
    if place is None:
        return request.raw_input_contents[0] if request.raw_input_contents else None
    if request.raw_input_contents or tensor.HasField("contents"):
        raise invalid("inputs[0]: values in the request and in shared memory; send them one "
                      "way")
    return shared.read(place, "inputs[0]")


def decode_input(request: pb.ModelInferRequest, state: VersionState, max_batch: int,
                 shared: SharedMemoryRegions) -> np.ndarray:
    """The request's single input -> u8 [N, H, W, 3] at the model's size, N <= max_batch."""
    info = state.model.info
    if len(request.inputs) != 1:
        raise invalid(f"inputs: {len(request.inputs)} given; send exactly one image input")
    tensor = request.inputs[0]
    raw = input_bytes(request, shared)
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
        check_batch(shape[0], max_batch)
        return data.reshape(shape)
    if tensor.datatype == "BYTES":
        items = (split_bytes_tensor(raw, max_batch) if raw is not None
                 else list(tensor.contents.bytes_contents))
        if not items or (shape and int(np.prod(shape)) != len(items)):
            raise invalid(f"inputs[0]: {len(items)} encoded images for shape {shape}")
        check_batch(len(items), max_batch)
        images = []
        for i, item in enumerate(items):
            try:
                images.append(resize_for_model(decode_image(item), info))
            except ImageError as exc:
                raise invalid(f"inputs[0] element {i}: {exc}") from None
        return np.stack(images)
    raise invalid(f"inputs[0].datatype {shown(tensor.datatype)}: send UINT8 [N, H, W, 3] or BYTES "
                  "(encoded JPEG/PNG images)")


def classification_counts(request: pb.ModelInferRequest, classes: int | None
                          ) -> dict[int, int]:
    """{output index: k} for the outputs that ask for Triton's classification extension
    (parameter `classification`: the top k classes as "score:index:label" instead of every
    score, which tritonclient asks with `InferRequestedOutput(name, class_count=k)`)."""
    counts = {}
    for i, output in enumerate(request.outputs):
        if "classification" not in output.parameters:
            continue
        parameter = output.parameters["classification"]
        k = getattr(parameter, parameter.WhichOneof("parameter_choice") or "int64_param")
        if output.name != SCORES_OUTPUT:
            raise invalid(f"outputs[{i}].parameters.classification: only {SCORES_OUTPUT!r} "
                          "holds class scores")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= (classes or k):
            raise invalid(f"outputs[{i}].parameters.classification {shown(k)}: give the number "
                          f"of top classes, 1 to {classes or 'the number of classes'}")
        counts[i] = k
    return counts


def top_classes(scores: np.ndarray, k: int, labels: list[str]) -> list[list[bytes]]:
    """Per image, its k best classes as Triton writes them: b"score:index:label", best first
    (ties: the lower index first)."""
    if k > scores.shape[1]:
        raise invalid(f"parameters.classification {k}: this model has {scores.shape[1]} classes")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(f"{row[c]:f}:{c}:{labels[c]}" if c < len(labels) else f"{row[c]:f}:{c}").encode()
             for c in best] for row, best in zip(scores, order)]


def bytes_tensor(items: list[bytes]) -> bytes:
    """KServe BYTES serialisation: each element as a 4-byte little-endian length + payload."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def check_batch(images: int, max_batch: int) -> None:
    if images > max_batch:
        raise invalid(f"inputs[0]: {images} images in one request, over this model's "
                      f"max_batch_size {max_batch}; split the request, or raise max_batch_size "
                      "in the server's config")


def stream_reply(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=response)


def stream_failure(request: pb.ModelInferRequest | None, code: grpc.StatusCode, message: str
                   ) -> pb.ModelStreamInferResponse:
    """A stream message that failed: its status and message as error_message (Triton's field,
    which tritonclient raises as the message's error), and the request's id, model and version
    so that the client knows which frame it was."""
    answer = pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
    if request is not None:
        answer.infer_response.id = request.id
        answer.infer_response.model_name = request.model_name
        answer.infer_response.model_version = request.model_version
    return answer


def output_places(request: pb.ModelInferRequest, shared: SharedMemoryRegions,
                  classified: dict[int, int]) -> dict[int, TensorPlace]:
    """{output index: place} for the requested outputs to be written to shared memory, each
    checked before the inference that fills it."""
    places = {}
    for i, output in enumerate(request.outputs):
        where = f"outputs[{i}]"
        place = tensor_place(output.parameters, where)
        if place is None:
            continue
        if i in classified:
            raise invalid(f"{where}: classification and shared memory both asked; the top "
                          f"classes come in the response, so drop {REGION}")
        shared.check(place, where)
        places[i] = place
    return places


def region_message(region: RegionStatus) -> pb.SystemSharedMemoryStatusResponse.RegionStatus:
    return pb.SystemSharedMemoryStatusResponse.RegionStatus(
        name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size)


def in_shared_memory(request: pb.ModelInferRequest) -> bool:
    return any(REGION in tensor.parameters for tensor in [*request.inputs, *request.outputs])


def mark_cache_hit(response: pb.ModelInferResponse, ms: float) -> None:
    """A cached answer's split is the lookup's, with `cache_hit` true."""
    for name in [n for n in response.parameters if n.endswith("_ms")]:
        del response.parameters[name]
    response.parameters["cache_hit"].bool_param = True
    response.parameters["cache_ms"].double_param = ms
    response.parameters["total_ms"].double_param = ms


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, streams: MessageStreams | None = None,
                 shared_memory: SharedMemoryRegions | None = None,
                 answers: CachedAnswers | None = None):
        self.repository = repository
        self.streams = streams
        self.shared_memory = shared_memory or SharedMemoryRegions(enabled=False)
        self.answers = answers or CachedAnswers(ResponseCache(0), lambda name: False)

    @rpc
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.repository.holding_back_readiness())

    @rpc
    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.repository.state(request.name,
                                                                 request.version).ready)

    @rpc
    def ServerMetadata(self, request, context):
        extensions = [*EXTENSIONS, *([SHARED_MEMORY_EXTENSION] if self.shared_memory.enabled
                                     else [])]
        return pb.ServerMetadataResponse(name="xaiserve", version=__version__,
                                         extensions=extensions)

    @rpc
    def ModelMetadata(self, request, context):
        state = served_version(self.repository, request.name, request.version)
        inputs, outputs = served_tensors(state.model)
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in self.repository.versions(request.name)],
            platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                            shape=t.shape) for t in inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                             shape=t.shape) for t in outputs])

    @rpc
    def ModelConfig(self, request, context):
        """Triton's configuration view, which Triton's clients and perf_analyzer read: the
        dims leave out the batch dimension, bounded by max_batch_size."""
        state = served_version(self.repository, request.name, request.version)
        settings = state.settings  # what this copy was compiled with (a reload may have failed)
        inputs, outputs = served_tensors(state.model)
        config = pb.ModelConfig(
            name=state.name, platform=PLATFORM, backend="openvino",
            max_batch_size=self.max_batch_size(state),
            input=[pb.ModelInput(name=t.name, data_type=TRITON_TYPES[t.datatype],
                                 format=pb.ModelInput.FORMAT_NHWC, dims=t.shape[1:])
                   for t in inputs],
            output=[pb.ModelOutput(name=t.name, data_type=TRITON_TYPES[t.datatype],
                                   dims=t.shape[1:]) for t in outputs],
            instance_group=[pb.ModelInstanceGroup(
                count=state.model.num_requests,
                kind=pb.ModelInstanceGroup.KIND_CPU if settings.device == "CPU"
                else pb.ModelInstanceGroup.KIND_MODEL)])
        for key, value in (("device", settings.device),
                           ("performance_hint", settings.performance_hint),
                           ("inference_precision", state.model.inference_precision),
                           ("map_inference_precision", state.model.map_inference_precision),
                           ("version", str(state.version))):
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    @rpc
    def ModelStatistics(self, request, context):
        """Cumulative counters per loaded version (service.statistics), as Triton reports
        them; an empty name means every model, an empty version every loaded one."""
        states = ([served_version(self.repository, request.name, request.version)]
                  if request.name and request.version else self.repository.states(request.name))
        response = pb.ModelStatisticsResponse()
        for state in states:
            if not state.ready:
                continue
            snap = state.statistics.snapshot()
            stats = response.model_stats.add(
                name=state.name, version=str(state.version),
                last_inference=snap.last_inference_ms, inference_count=snap.inference_count,
                execution_count=snap.execution_count)
            for bucket, duration in snap.durations.items():
                getattr(stats.inference_stats, bucket).CopyFrom(
                    pb.StatisticDuration(count=duration.count, ns=duration.ns))
        return response

    # --- Triton's model repository extension ------------------------------------------------

    def _check_repository_name(self, given: str) -> None:
        folder = Path(self.repository.settings.repository)
        if given not in ("", folder.name, str(folder)):
            raise invalid(f"repository_name {shown(given)}: this server has one repository "
                          f"({folder.name}); leave it empty")

    @rpc
    def RepositoryIndex(self, request, context):
        """Every version on disk or loaded, READY, LOADING or UNAVAILABLE with the reason (a
        failed load, not among the latest_versions)."""
        self._check_repository_name(request.repository_name)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=str(e.version),
                                                  state=e.state, reason=e.reason)
            for e in self.repository.index() if e.state == "READY" or not request.ready])

    @rpc
    def RepositoryModelLoad(self, request, context):
        """The repository is polled, so a model is loaded by writing its folder; this makes the
        poll happen now and answers once the model's versions are ready: OK when its newest
        version serves, FAILED_PRECONDITION with the reason when that one failed to load."""
        self._check_repository_name(request.repository_name)
        name = request.model_name
        if request.parameters:
            raise invalid(f"parameters {sorted(request.parameters)}: this server loads the files "
                          f"in its repository folder; write them under {name or 'NAME'}/VERSION/ "
                          "and send no parameters")
        remaining = context.time_remaining()
        try:
            states = self.repository.load_now(name, min(remaining or LOAD_WAIT_SECONDS,
                                                        LOAD_WAIT_SECONDS))
        except NotServed:
            raise NotServed(f"model_name {shown(name)}: no version of it in the repository "
                            f"{self.repository.settings.repository} (a folder "
                            f"{name or 'NAME'}/<version>/ with model.xml); export it there "
                            "first") from None
        newest = ([s for s in states if not s.removed] or states)[-1]
        if newest.ready:
            return pb.RepositoryModelLoadResponse()
        serving = [s.version for s in states if s.ready]
        fallback = f"; version {serving[-1]} serves" if serving else ""
        if newest.error:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} version {newest.version} failed to load: "
                               f"{newest.error}{fallback}")
        raise unavailable(f"model {name!r} version {newest.version} is still loading{fallback}")

    @rpc
    def RepositoryModelUnload(self, request, context):
        self._check_repository_name(request.repository_name)
        name = request.model_name
        self.repository.states(name)  # NOT_FOUND for a model not served, listing those that are
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"model_name {name!r}: this server serves what its repository holds "
                           f"(looked at every {self.repository.settings.poll_seconds:g} s); to "
                           f"unload it remove {Path(self.repository.settings.repository) / name}"
                           ", or a version folder, or pin its versions (or bound "
                           "latest_versions) in its config")

    # --- Triton's system shared memory extension (service.shared_memory) --------------------

    @rpc
    def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shared_memory.status(request.name):
            response.regions[region.name].CopyFrom(region_message(region))
        return response

    @rpc
    def SystemSharedMemoryRegister(self, request, context):
        self.shared_memory.register(request.name, request.key, request.offset,
                                    request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    def SystemSharedMemoryUnregister(self, request, context):
        self.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def max_batch_size(self, state: VersionState) -> int:
        """The configured bound, or the IR's own batch size where it is static."""
        bound = self.repository.settings.for_model(state.name).max_batch_size
        return min(bound, state.model.static_batch or bound)

    @rpc
    def ModelInfer(self, request, context):
        started = time.perf_counter()
        state = served_version(self.repository, request.model_name, request.model_version)

        def compute() -> pb.ModelInferResponse:
            with state.statistics.measure() as split:
                response = self._infer(request, state, started, split.timings_ms)
                split.images = response.outputs[0].shape[0]
            return response
        return self.answers.answer("ModelInfer", state, request, in_shared_memory(request),
                                   pb.ModelInferResponse, compute, mark_cache_hit,
                                   images=lambda response: response.outputs[0].shape[0])

    def ModelStreamInfer(self, requests: CallerStream, context):
        """Triton's streaming extension: each message a ModelInfer, answered on the stream in
        the order they came (service.message_stream)."""
        if self.streams is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server takes no streams; send "
                          "ModelInfer calls")
        return self.streams.answer(requests, context, StreamAnswers(
            "ModelStreamInfer", self.ModelInfer, stream_reply, stream_failure))

    def _infer(self, request, state: VersionState, started: float, timings: dict[str, float]
               ) -> pb.ModelInferResponse:
        model = state.model
        batch = decode_input(request, state, self.max_batch_size(state), self.shared_memory)
        timings["decode"] = (time.perf_counter() - started) * 1e3
        wanted = [o.name for o in request.outputs] or [SCORES_OUTPUT]
        available = {SCORES_OUTPUT} | ({SALIENCY_OUTPUT} if model.has_saliency else set())
        for i, name in enumerate(wanted):
            if name not in available:
                raise invalid(f"outputs[{i}].name {shown(name)}: this model has "
                              f"{sorted(available)}")
        top = classification_counts(request, len(model.info.labels) or None)
        places = output_places(request, self.shared_memory, top)
        results = model.predict(batch, tuple(wanted), timings)
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=str(state.version), id=request.id)
        for i, name in enumerate(wanted):
            array = np.ascontiguousarray(results[name], dtype=np.float32)
            if i in top:
                classes = top_classes(array, top[i], model.info.labels)
                response.outputs.add(name=name, datatype="BYTES", shape=[len(classes), top[i]])
                response.raw_output_contents.append(bytes_tensor(
                    [text for row in classes for text in row]))
                continue
            output = response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            if i in places:  # written there; an empty entry keeps the outputs' order
                self.shared_memory.write(places[i], array.tobytes(), f"outputs[{i}]")
                output.parameters[REGION].string_param = places[i].region
                output.parameters[BYTE_SIZE].int64_param = array.nbytes
                response.raw_output_contents.append(b"")
                continue
            response.raw_output_contents.append(array.tobytes())
        timings["total"] = (time.perf_counter() - started) * 1e3
        for stage, ms in timings.items():  # the server's split of this request, in ms
            response.parameters[f"{stage}_ms"].double_param = ms
        return response
