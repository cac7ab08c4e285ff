"""What every RPC goes through, in one place: the token check, the limit on concurrent
requests, reading the request, the request id, the size of the response, the metrics and the
access log. Handlers stay free of all of it.
The metrics and the log line are written just after the response is sent, so a scrape or a
log reader sees a call a moment after its client does.

Health checks are exempt from the token and the limit, so that probes work and are never
refused under load. No lock is held while a request runs: the limit is a non-blocking
semaphore and the metrics take only their own short per-value locks."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable

import grpc

from . import request_context
from .errors import RETRY_LATER
from .logs import RECORD_FIELDS
from .message_stream import CallerStream
from .model_slots import ModelSlots
from .proto import grpc_predict_v2_pb2 as kpb
from .proto import xaiserve_pb2 as xpb
from .request_context import RequestRecord
from .security import matching_token
from .telemetry import Telemetry

log = logging.getLogger("xaiserve.access")

HEALTH_SERVICE = "grpc.health.v1.Health"
QUIET_METHODS = {"ServerLive", "ServerReady", "ModelReady"}  # probes: logged at DEBUG
MAX_ID_CHARS = 128
COMPRESS_FROM = 16 * 1024  # bytes: a response smaller than this is sent as it is
# the settings' response_compression names (also HTTP's Content-Encoding names)
COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip,
               "deflate": grpc.Compression.Deflate}

_HANDLER_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                  ("unary_stream", grpc.unary_stream_rpc_method_handler),
                  ("stream_unary", grpc.stream_unary_rpc_method_handler),
                  ("stream_stream", grpc.stream_stream_rpc_method_handler))


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind that answers `code` without reading the request."""
    def abort(request, context):
        context.abort(code, message)

    for kind, make in _HANDLER_KINDS:
        if getattr(handler, kind) is not None:
            return make(abort, request_deserializer=None,
                        response_serializer=handler.response_serializer)
    return handler


# requests whose `name` is a shared memory region's, not a model's
REGION_REQUESTS = (kpb.SystemSharedMemoryStatusRequest, kpb.SystemSharedMemoryRegisterRequest,
                   kpb.SystemSharedMemoryUnregisterRequest)


def _model_name(request) -> str:
    if isinstance(request, REGION_REQUESTS):
        return ""
    for field in ("model_name", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value
    return ""


class RequestInterceptor(grpc.ServerInterceptor):
    def __init__(self, telemetry: Telemetry, max_concurrent: int,
                 tokens: Callable[[], dict[str, str]] = dict,
                 max_response_bytes: int | None = None,
                 served: Callable[[str], bool] = lambda name: False,
                 compression: grpc.Compression = grpc.Compression.NoCompression,
                 model_limit: Callable[[str], int] = lambda name: 0):
        self.telemetry = telemetry
        self.tokens = tokens  # {token: token_id} a call may carry now (none: no check)
        self.max_concurrent = max_concurrent
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.served = served  # is a model name served? (untrusted names stay out of labels)
        self.model_slots = ModelSlots(model_limit, served)
        # gRPC refuses a larger response after the work is done, with a message that names no
        # field, and the call would be counted as answered; checked here, it is a clear error.
        self.max_response_bytes = max_response_bytes
        # for responses over COMPRESS_FROM bytes (maps: 196 KB of floats per image on Lite0,
        # half that gzipped), when the client accepts it; small ones are not worth the CPU
        self.compression = compression

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").partition("/")
        if service == HEALTH_SERVICE:
            return handler
        caller = self.authenticate(method, details.invocation_metadata)
        if caller is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong token: send metadata 'authorization: Bearer "
                            "<token>' (xaiserve explain --token-file FILE)")
        if handler.stream_stream is not None and not service.startswith("grpc."):
            return self._message_stream(handler, caller)
        if handler.unary_unary is None:  # reflection's stream: no model, nothing to measure
            return handler
        inner = handler.unary_unary
        deserialize = handler.request_deserializer or (lambda raw: raw)

        def call(raw: bytes, context):
            # Read here rather than by gRPC, which answers a malformed message with INTERNAL
            # and never reaches the interceptor (no log line, no metric).
            try:
                request = deserialize(raw)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError, bad UTF-8 in a string
                self.refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {method} request is not a valid protobuf message of its "
                            "type; build it with the stubs generated from protos/")
            return self.handle(method, inner, request, context, caller)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=None, response_serializer=handler.response_serializer)

    @staticmethod
    def _message_stream(handler, caller: str):
        """A stream of requests (service.message_stream): its messages read leniently, each
        run through `handle` as a call of its own by MessageStreams, with the stream's
        caller."""
        inner = handler.stream_stream
        deserialize = handler.request_deserializer or (lambda raw: raw)

        def stream(raw_messages, context):
            return inner(CallerStream(raw_messages, deserialize, caller), context)

        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=None, response_serializer=handler.response_serializer)

    def authenticate(self, method: str, metadata, protocol: str = "grpc") -> str | None:
        """The id of the server's token the call carries ("" when the server has none), or
        None, counted as UNAUTHENTICATED, when the call must be refused."""
        tokens = self.tokens()
        if not tokens:
            return ""
        caller = tokens.get(matching_token(metadata, tokens), "")
        if not caller:  # counted and logged at once: an access log shows who was turned away
            record = RequestRecord(method, protocol=protocol)
            record.trace_id, record.span_id = request_context.trace_context(metadata)
            self._finish(record, grpc.StatusCode.UNAUTHENTICATED, 0.0, None)
            return None
        return caller

    def refuse(self, context, method: str, code: grpc.StatusCode, message: str,
               protocol: str = "grpc") -> None:
        """Answer a call whose request could not be read (counted and logged like any other)."""
        self._after_response(context, RequestRecord(method, protocol=protocol), code, 0.0, None)
        context.abort(code, message)

    def handle(self, method: str, inner, request, context, caller: str,
               protocol: str = "grpc",
               encode: Callable[[object], tuple[object, int]] | None = None):
        """Run `inner(request, context)` under the caps, with the request's record, metrics
        and access log: for a gRPC call, and for a REST one (service.rest) alike. `encode`
        (the REST side's writer: response -> (answer, its size in bytes)) runs here, so that
        the size limit holds for what is sent (numbers as JSON text outgrow the protobuf) and
        a refusal is counted as one."""
        record = RequestRecord(method, self._request_id(request), _model_name(request),
                               token_id=caller, protocol=protocol)
        record.trace_id, record.span_id = request_context.trace_context(
            context.invocation_metadata())
        if not self.slots.acquire(blocking=False):
            self._exhausted(context, record, f"the server is handling its maximum of "
                            f"{self.max_concurrent} concurrent requests (max_concurrent_requests)")
        release_model_slot = self.model_slots.take(record.model) if record.model else None
        if record.model and release_model_slot is None:
            self.slots.release()
            self._exhausted(context, record, f"model {record.model!r} is handling its maximum "
                            f"of {self.model_slots.limit(record.model)} concurrent requests (its "
                            "max_requests_in_flight in the config)")
        token = request_context.enter(record)
        self.telemetry.in_flight.inc()
        start = time.perf_counter()
        response, code = None, grpc.StatusCode.UNKNOWN
        try:
            response = inner(request, context)
            if encode is None:
                answer, size = response, response.ByteSize() if response is not None else 0
            else:
                answer, size = encode(response)
            self._check_size(method, size, context, protocol)
            if size >= COMPRESS_FROM and self.compression != grpc.Compression.NoCompression:
                context.set_compression(self.compression)
            code = context.code() or grpc.StatusCode.OK
            return answer
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            seconds = time.perf_counter() - start
            self.telemetry.in_flight.dec()
            if release_model_slot is not None:
                release_model_slot()
            self.slots.release()
            request_context.leave(token)
            self._after_response(context, record, code, seconds, response)

    def _exhausted(self, context, record: RequestRecord, what: str) -> None:
        """Refuse a call over a concurrency cap at once (counted, logged), instead of queueing."""
        self._after_response(context, record, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0, None)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, what + RETRY_LATER)

    def _after_response(self, context, record: RequestRecord, code: grpc.StatusCode,
                        seconds: float, response) -> None:
        """Count and log the call once gRPC has sent its answer, as a web server writes its
        access log: done before, the log line and the metrics add to every call's latency
        (a 12 ms Explain took about 4% longer, median of 12 interleaved rounds). gRPC runs the
        callback on its serving thread when the call ends, cancelled or not; a call that has
        already ended is counted at once."""
        finish = functools.partial(self._finish, record, code, seconds, response)
        if not context.add_callback(finish):
            finish()

    def _check_size(self, method: str, size: int, context, protocol: str) -> None:
        """RESOURCE_EXHAUSTED when a response of `size` bytes is over the limit."""
        if self.max_response_bytes and size > self.max_response_bytes:
            binary = ', outputs as binary data ("binary_data": true)' \
                if protocol == "http" and method == "ModelInfer" else ""
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the {method} response would be {size} bytes, over the server's "
                          f"max_message_bytes of {self.max_response_bytes}: ask for less (fewer "
                          f"images or target_classes, map_format FLOAT or a PNG{binary}) or "
                          "raise --max-message-bytes")

    @staticmethod
    def _request_id(request) -> str:
        """The client's id (Explain / KServe `id`), else a generated one the response echoes."""
        if not hasattr(request, "id") or not isinstance(request.id, str):
            return request_context.new_request_id()
        if not request.id:
            request.id = request_context.new_request_id()
        return request.id[:MAX_ID_CHARS]

    def _finish(self, record: RequestRecord, code: grpc.StatusCode, seconds: float,
                response) -> None:
        ok = code == grpc.StatusCode.OK
        if not (ok or (record.model and self.served(record.model))):
            record.model = ""
        if ok:
            record.version = str(getattr(response, "model_version", "") or "")
            self._observe_success(record, seconds, response)
        self._count(record, record.model, code, seconds)
        level = logging.DEBUG if ok and record.method in QUIET_METHODS else logging.INFO
        log.log(level, "%s %s", record.method, code.name, extra={
            **{name: getattr(record, name) for name in RECORD_FIELDS},
            "code": code.name, "ms": round(seconds * 1e3, 3)})

    def _count(self, record: RequestRecord, model: str, code: grpc.StatusCode,
               seconds: float) -> None:
        t = self.telemetry
        t.request_seconds.labels(record.method).observe(seconds)
        if record.token_id:
            t.token_calls.labels(record.token_id).inc()
        # last: a scrape that sees a call in requests_total sees its other samples too
        t.requests.labels(model, record.version, record.method, code.name, record.protocol).inc()

    def _observe_success(self, record: RequestRecord, seconds: float, response) -> None:
        t = self.telemetry
        model, version = record.model, record.version
        # by what answered: ModelInfer and a stream's message alike, over gRPC or REST
        if isinstance(response, kpb.ModelInferResponse):  # the inference alone, as reported
            if "cache_hit" not in response.parameters:  # a cached answer ran no inference
                ms = response.parameters["inference_ms"].double_param \
                    if "inference_ms" in response.parameters else seconds * 1e3
                t.inference_seconds.labels(model, version).observe(ms / 1e3)
        elif isinstance(response, xpb.ExplainResponse):
            timings = response.timings_ms
            if "inference" in timings:
                t.inference_seconds.labels(model, version).observe(timings["inference"] / 1e3)
            if "explanation" in timings and response.maps:
                t.explanation_seconds.labels(model, version, response.maps[0].method).observe(
                    timings["explanation"] / 1e3)
        if record.forward_passes is not None:
            t.forward_passes.labels(model, version).observe(record.forward_passes)
