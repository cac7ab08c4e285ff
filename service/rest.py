"""The REST side of the Open Inference Protocol (KServe v2 over HTTP), on a port of its own:
curl, tritonclient.http, KServe's InferenceRESTClient and `perf_analyzer -i http` work
unchanged, and explanations are one POST away for clients without gRPC.

Every endpoint is a gRPC method: its request message is built from the URL and the body, and
it runs through the same servicer method and the same RequestInterceptor as a gRPC call, so the
token, the concurrency caps, the response size limit, the metrics and the access log have one
implementation. A `DetachedCall` is what the interceptor and the handlers see of the HTTP
exchange (the few calls they make on a gRPC context; HTTP carries no deadline, the client's
timeout shows as a disconnect). The health endpoints, like gRPC's health service,
need no token and take no request slot: kubelet's httpGet probes must never be refused."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import anyio
import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .detached_call import CallAborted, DetachedCall
from .errors import RETRY_LATER, RequestError
from .interceptor import COMPRESS_FROM, COMPRESSION, RequestInterceptor
from .proto import grpc_predict_v2_pb2 as pb
from .proto import xaiserve_pb2 as xai_pb
from .rest_messages import (HEADER_LENGTH, InferCall, infer_body, message_json, parse_infer,
                            parse_message, parse_repository_request)

log = logging.getLogger("xaiserve.rest")

# gRPC status -> HTTP status, as Triton's and KServe's HTTP servers answer them
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
UNAUTHENTICATED = ("missing or wrong token: send the header 'Authorization: Bearer <token>' "
                   "with a token of the server's --token-file")
# grpc.Compression -> the Content-Encoding it is over HTTP
ENCODINGS = {algorithm: name for name, algorithm in COMPRESSION.items() if name != "none"}
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers; a longer head is refused (400)
# a request body must arrive within this long: a client trickling bytes would otherwise hold
# its connection and up to max_message_bytes of memory for ever (a 150 KB image over a slow
# edge link takes seconds)
BODY_SECONDS = 60.0


class BodyRefused(Exception):
    """A request body that is not read: too large, or in an encoding the server cannot undo."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]


def json_reply(value, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode(),
                 {"content-type": "application/json"})


def http_status(code: grpc.StatusCode, message: str) -> int:
    """The HTTP status of a gRPC one. RESOURCE_EXHAUSTED is two answers over HTTP: 429 for a
    call refused at a concurrency cap, which may succeed later (clients that retry on 429 do),
    and 400 for one over a size or count limit, which never will."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 429 if message.endswith(RETRY_LATER) else 400
    return HTTP_STATUS.get(code, 500)


def error_reply(code: grpc.StatusCode, message: str, status: int | None = None) -> Reply:
    reply = json_reply({"error": message}, status or http_status(code, message))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        reply.headers["www-authenticate"] = "Bearer"
    if reply.status == 429:
        reply.headers["retry-after"] = "1"
    return reply


@dataclass(frozen=True)
class Endpoint:
    """A REST endpoint: the gRPC method it is, how its request is read from the path
    parameters and the body, and how its response is written."""

    method: str
    read: Callable[[dict, bytes, Request], object]
    write: Callable[[object, object], Reply] = lambda response, request: json_reply(
        message_json(response))
    health: bool = False  # no token, no request slot (probes)


def _model(params: dict) -> tuple[str, str]:
    return params.get("name", ""), params.get("version", "")


def _readiness(field: str) -> Callable[[object, object], Reply]:
    """200 when true, 503 when not (KServe's answer; the protocol: a 4xx or 5xx is false)."""
    def write(response, _request) -> Reply:
        value = getattr(response, field)
        return json_reply({field: value}, 200 if value else 503)
    return write


def _read_infer(params: dict, body: bytes, request: Request) -> InferCall:
    return parse_infer(body, request.headers.get(HEADER_LENGTH), *_model(params))


def _write_infer(response: pb.ModelInferResponse, call: InferCall) -> Reply:
    body, header_length = infer_body(response, call)
    if header_length is None:
        return Reply(200, body, {"content-type": "application/json"})
    return Reply(200, body, {"content-type": "application/octet-stream",
                             HEADER_LENGTH: str(header_length)})


def _read_explain(params: dict, body: bytes, _request: Request) -> xai_pb.ExplainRequest:
    request = parse_message(body, xai_pb.ExplainRequest(), "explain")
    request.model_name, version = _model(params)
    request.model_version = version or request.model_version
    return request


def _read_index(_params: dict, body: bytes, _request: Request) -> pb.RepositoryIndexRequest:
    return parse_message(body, pb.RepositoryIndexRequest(), "repository index")


def _write_index(response: pb.RepositoryIndexResponse, _request) -> Reply:
    """Triton's REST answer: the list itself."""
    return json_reply(message_json(response)["models"])


def _model_request(message: type) -> Callable[[dict, bytes, Request], object]:
    def read(params: dict, _body: bytes, _request: Request):
        name, version = _model(params)
        return message(name=name, version=version)
    return read


def _load_request(message: type) -> Callable[[dict, bytes, Request], object]:
    def read(params: dict, body: bytes, _request: Request):
        return parse_repository_request(body, message(), params["name"])
    return read


def _region_request(message: type) -> Callable[[dict, bytes, Request], object]:
    """Triton's shared memory paths: the region's name in the path (none: every region), a
    registration's key, offset and byte_size in the body."""
    def read(params: dict, body: bytes, _request: Request):
        request = parse_message(body, message(), "shared memory region")
        request.name = params.get("name", "")
        return request
    return read


def _write_regions(response: pb.SystemSharedMemoryStatusResponse, _request) -> Reply:
    """Triton's REST answer: a list of the regions."""
    return json_reply([message_json(region) for region in response.regions.values()])


def endpoints() -> list[tuple[str, str, Endpoint]]:
    """(HTTP method, path, endpoint), model paths with and without /versions/V."""
    model = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    regions = ("/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{name}")
    table = [
        ("GET", ("/v2",), Endpoint("ServerMetadata",
                                   lambda p, b, r: pb.ServerMetadataRequest())),
        ("GET", ("/v2/health/live",), Endpoint("ServerLive", lambda p, b, r: pb.ServerLiveRequest(),
                                               _readiness("live"), health=True)),
        ("GET", ("/v2/health/ready",), Endpoint(
            "ServerReady", lambda p, b, r: pb.ServerReadyRequest(), _readiness("ready"),
            health=True)),
        ("GET", ("/v2/models/stats",), Endpoint(
            "ModelStatistics", lambda p, b, r: pb.ModelStatisticsRequest())),
        ("GET", model, Endpoint("ModelMetadata", _model_request(pb.ModelMetadataRequest))),
        ("GET", tuple(f"{m}/ready" for m in model), Endpoint(
            "ModelReady", _model_request(pb.ModelReadyRequest), _readiness("ready"))),
        ("GET", tuple(f"{m}/config" for m in model), Endpoint(
            "ModelConfig", _model_request(pb.ModelConfigRequest),
            lambda response, _r: json_reply(message_json(response.config)))),
        ("GET", tuple(f"{m}/stats" for m in model), Endpoint(
            "ModelStatistics", _model_request(pb.ModelStatisticsRequest))),
        ("POST", tuple(f"{m}/infer" for m in model), Endpoint(
            "ModelInfer", _read_infer, _write_infer)),
        ("POST", tuple(f"{m}/explain" for m in model), Endpoint("Explain", _read_explain)),
        ("POST", ("/v2/repository/index",), Endpoint("RepositoryIndex", _read_index,
                                                     _write_index)),
        ("POST", ("/v2/repository/models/{name}/load",), Endpoint(
            "RepositoryModelLoad", _load_request(pb.RepositoryModelLoadRequest))),
        ("POST", ("/v2/repository/models/{name}/unload",), Endpoint(
            "RepositoryModelUnload", _load_request(pb.RepositoryModelUnloadRequest))),
        ("GET", tuple(f"{r}/status" for r in regions), Endpoint(
            "SystemSharedMemoryStatus", _region_request(pb.SystemSharedMemoryStatusRequest),
            _write_regions)),
        ("POST", (f"{regions[1]}/register",), Endpoint(
            "SystemSharedMemoryRegister", _region_request(pb.SystemSharedMemoryRegisterRequest))),
        ("POST", tuple(f"{r}/unregister" for r in regions), Endpoint(
            "SystemSharedMemoryUnregister",
            _region_request(pb.SystemSharedMemoryUnregisterRequest))),
    ]
    return [(verb, path, endpoint) for verb, paths, endpoint in table for path in paths]


def describe(table: list[tuple[str, str, Endpoint]]) -> str:
    """The endpoints in one line, for the answers to unknown paths and methods: each verb's
    paths, NAME for a model, the /versions/V form of model paths said once."""
    paths: dict[str, list[str]] = {}
    for verb, path, _ in table:
        if "{version}" not in path:
            paths.setdefault(verb, []).append(path.replace("{name}", "NAME"))
    return ("; ".join(f"{verb} {', '.join(listed)}" for verb, listed in paths.items())
            + "; each /v2/models/NAME/... also as /v2/models/NAME/versions/V/...")


class RestApp:
    """The endpoints as a Starlette app: the body is read on the event loop (bounded by
    max_message_bytes), everything else (reading it, the model, writing the answer) on a
    worker thread, as many at once as the gRPC side's threads."""

    def __init__(self, servicers: tuple, interceptor: RequestInterceptor,
                 max_body_bytes: int, threads: int):
        table = endpoints()
        # gRPC method name -> the servicer method that answers it (request, context)
        self.handlers = {endpoint.method: next(getattr(s, endpoint.method) for s in servicers
                                               if hasattr(s, endpoint.method))
                         for _, _, endpoint in table}
        self.interceptor = interceptor
        self.max_body_bytes = max_body_bytes
        self.threads = threads
        self.body_seconds = BODY_SECONDS
        self._limiter: anyio.CapacityLimiter | None = None
        routes = [Route(path, self._endpoint(endpoint), methods=[verb])
                  for verb, path, endpoint in table]
        self.endpoint_list = describe(table)
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._no_route})

    async def _no_route(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            message = f"{request.method} {request.url.path}: not allowed here; the endpoints: "
        else:
            message = f"no endpoint {request.method} {request.url.path}; the endpoints: "
        return JSONResponse({"error": message + self.endpoint_list}, exc.status_code)

    def _endpoint(self, endpoint: Endpoint):
        async def respond(request: Request) -> Response:
            call = DetachedCall(request.headers.items())
            # the token before the body: a caller without one cannot make the server read and
            # hold max_message_bytes
            caller = "" if endpoint.health else self.interceptor.authenticate(
                endpoint.method, call.invocation_metadata(), "http")
            try:
                body = None if caller is None else await self._timed_body(request)
            except BodyRefused as exc:
                with contextlib.suppress(CallAborted):  # counted and logged as a gRPC refusal
                    self.interceptor.refuse(call, endpoint.method, exc.code, exc.message, "http")
                body = error_reply(exc.code, exc.message, exc.status)
            if caller is None:
                reply = error_reply(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
            elif isinstance(body, Reply):
                reply = body
            else:
                watcher = asyncio.ensure_future(self._watch_disconnect(request, call))
                if self._limiter is None:
                    self._limiter = anyio.CapacityLimiter(self.threads)
                try:
                    reply = await anyio.to_thread.run_sync(
                        self._serve, endpoint, request.path_params, body, request, call,
                        caller, limiter=self._limiter)
                finally:
                    watcher.cancel()
            return Response(reply.body, reply.status, reply.headers,
                            background=BackgroundTask(call.end))
        return respond

    async def _timed_body(self, request: Request) -> bytes:
        try:
            return await asyncio.wait_for(self._body(request), self.body_seconds)
        except asyncio.TimeoutError:
            raise BodyRefused(408, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the request body did not arrive within {self.body_seconds:g} s; "
                              "send it whole, or a smaller one") from None

    async def _body(self, request: Request) -> bytes:
        """The request body, inflated when the client compressed it (tritonclient.http's
        request_compression_algorithm); BodyRefused (413) when it is over max_message_bytes."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise BodyRefused(400, grpc.StatusCode.INVALID_ARGUMENT,
                              f"header Content-Encoding {encoding!r}: send gzip, deflate or "
                              "an uncompressed body")
        inflate = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = inflate.decompress(body, self.max_body_bytes + 1)
        except zlib.error as exc:
            raise BodyRefused(400, grpc.StatusCode.INVALID_ARGUMENT,
                              f"the body is not {encoding} data ({exc}); compress it as the "
                              "Content-Encoding header says") from None
        if len(body) > self.max_body_bytes:
            raise self._too_large()
        return body

    def _too_large(self) -> BodyRefused:
        return BodyRefused(413, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the request body is over the server's max_message_bytes of "
                           f"{self.max_body_bytes}: send fewer images, or raise "
                           "--max-message-bytes")

    @staticmethod
    async def _watch_disconnect(request: Request, call: DetachedCall) -> None:
        """End the call when the client goes away before its answer (what gRPC reports as a
        cancelled call), so that a black-box explanation stops working for nobody."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        call.end()

    def _serve(self, endpoint: Endpoint, params: dict, body: bytes, request: Request,
               call: DetachedCall, caller: str) -> Reply:
        """On a worker thread: read the request, run it through the interceptor, write."""
        handler = self.handlers[endpoint.method]
        try:
            if endpoint.health:
                return endpoint.write(handler(endpoint.read(params, body, request), call), None)
            try:
                read = endpoint.read(params, body, request)
            except RequestError as exc:
                self.interceptor.refuse(call, endpoint.method, exc.code, exc.message, "http")
            message = read.request if isinstance(read, InferCall) else read
            def encode(response) -> tuple[Reply, int]:
                reply = endpoint.write(response, read)
                return reply, len(reply.body)
            reply = self.interceptor.handle(endpoint.method, handler, message, call, caller,
                                            protocol="http", encode=encode)
            return self._compressed(reply, request, call)
        except CallAborted as exc:
            return error_reply(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("%s over HTTP failed", endpoint.method)
            return error_reply(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])

    @staticmethod
    def _compressed(reply: Reply, request: Request, call: DetachedCall) -> Reply:
        """Compressed as the server's response_compression says, when the interceptor found
        the response large enough and the client accepts that encoding."""
        encoding = ENCODINGS.get(call.compression)
        accepted = request.headers.get("accept-encoding", "").lower()
        if (encoding is None or len(reply.body) < COMPRESS_FROM
                or encoding not in [e.split(";")[0].strip() for e in accepted.split(",")]):
            return reply
        body = gzip.compress(reply.body, 6) if encoding == "gzip" else zlib.compress(reply.body, 6)
        return Reply(reply.status, body, {**reply.headers, "content-encoding": encoding})


class HeadBoundProtocol(H11Protocol):
    """uvicorn's h11 protocol, where each request head must come whole within the keep-alive
    time (75 s) of the connection opening or the response before: uvicorn times a connection
    out only after a response, and any bytes restart that clock, so a client that connected
    and sent nothing, or a header line now and then, held its socket for ever."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._head_timer is not None:
            self._head_timer.cancel()

    def _await_head(self) -> None:
        """One timer a connection, started again after each response (not one per response:
        hundreds of requests a second would keep tens of thousands of them waiting)."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_overdue,
                                                self.cycle)

    def _head_overdue(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request since
            self.transport.close()


class RestServer:
    """uvicorn serving a RestApp on its own thread, on a socket bound at construction (so a
    port in use is an error at start, and port 0 is known at once)."""

    def __init__(self, app: RestApp, host: str, port: int, ssl_context=None):
        self.app = app
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP,
        # and without it a response's headers and body wait on the client's delayed ACK
        # (44 ms per call here, against 0.2)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(2048)
        except OSError:
            self.socket.close()
            raise
        self.port = self.socket.getsockname()[1]
        # h11, whose request head is bounded in size (httptools, uvicorn's faster parser,
        # read a 200 MB header line into memory), and here in time (HeadBoundProtocol)
        config = uvicorn.Config(app.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", server_header=False, timeout_keep_alive=75,
                                http=HeadBoundProtocol,
                                h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                ssl_context_factory=(lambda _config, _default: ssl_context)
                                if ssl_context else None)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                       daemon=True, name="rest")

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        give_up = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > give_up:
                raise OSError(f"the REST server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self, grace: float) -> None:
        """No new connections; requests in flight get `grace` seconds."""
        self.uvicorn.config.timeout_graceful_shutdown = max(grace, 0.1)
        self.uvicorn.should_exit = True
        self.thread.join(grace + 5)
        self.socket.close()
