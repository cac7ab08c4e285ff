"""A small Python client for the explanation service (KServe v2 clients work as they are)."""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from .proto import grpc_predict_v2_pb2 as kpb
from .proto import grpc_predict_v2_pb2_grpc as kserve_grpc
from .proto import xaiserve_pb2 as pb
from .proto import xaiserve_pb2_grpc as pb_grpc
from .security import ServerAccess

MAP_FORMATS = {"float": pb.MAP_FORMAT_FLOAT, "u8": pb.MAP_FORMAT_U8_IMAGE,
               "heatmap": pb.MAP_FORMAT_PNG_HEATMAP, "overlay": pb.MAP_FORMAT_PNG_OVERLAY}
METHODS = {"auto": pb.METHOD_AUTO, "white-box": pb.METHOD_WHITE_BOX,
           "black-box": pb.METHOD_BLACK_BOX}


def check_port(address: str) -> None:
    """gRPC reads a HOST:PORT port modulo 65536 (99999 becomes 34463, another service):
    refuse ports outside 1..65535 instead."""
    if not address:
        raise ValueError("--server: empty; give HOST:PORT")
    if address.startswith(("http://", "https://")):  # gRPC waits on such a target, then fails
        raise ValueError(f"--server {address}: a URL; give the gRPC port as HOST:PORT")
    _, colon, port = address.rpartition(":")
    if colon and port.isdigit() and not 1 <= int(port) <= 65535 and "/" not in address:
        raise ValueError(f"--server {address}: port {port} is outside 1..65535")


SERVICES = ("xaiserve.v1.ExplanationService", "inference.GRPCInferenceService")


def retry_config(retries: int) -> str:
    """gRPC's own retry policy as a service config: UNAVAILABLE (a server restarting or
    draining, a version still compiling, a connection refused) is tried again `retries` times
    with exponential backoff, within the call's deadline. Every call of both services is
    stateless, so a repeat is safe; other codes are answers and come back at once."""
    return json.dumps({"methodConfig": [{
        "name": [{"service": service} for service in SERVICES],
        "retryPolicy": {"maxAttempts": retries + 1, "initialBackoff": "0.5s",
                        "maxBackoff": "5s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def open_channel(address: str, max_message_bytes: int = 64 * 1024 * 1024,
                 own_connection: bool = False,
                 credentials: grpc.ChannelCredentials | None = None,
                 retries: int = 4) -> grpc.Channel:
    """A channel with large message limits, TLS when `credentials` are given, and `retries`
    of UNAVAILABLE calls (0: none; a benchmark's load must count failures, not hide them).
    `own_connection`: its own TCP connection; gRPC otherwise shares one connection between
    channels with equal arguments, so N load clients would be N streams on one socket."""
    check_port(address)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if retries:  # gRPC allows at most 5 attempts
        options += [("grpc.enable_retries", 1),
                    ("grpc.service_config", retry_config(min(retries, 4)))]
    else:
        options.append(("grpc.enable_retries", 0))
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def explain_request(image: bytes | pb.Image, model: str, *, version: str = "",
                    targets: list[int] | None = None, top_k: int = 1, method: str = "auto",
                    map_format: str = "overlay", num_masks: int = 0, seed: int = 0,
                    label: int | None = None, boxes: list[tuple[float, float, float, float]] = (),
                    mask: bytes | None = None, metrics: list[str] = (),
                    metric_options: dict | None = None,
                    thresholds: dict[str, float] | None = None) -> pb.ExplainRequest:
    """An ExplainRequest from plain values (method and map format by their CLI names): `image`
    encoded, or an Image (a frame in shared memory: service.shared_frames). `boxes` (x_min,
    y_min, x_max, y_max) and `mask` (PNG, the image's size) are ground truth for Shared
    Interest; `metrics` names extra metrics ("all", "faithfulness", ...);
    `metric_options` holds MetricOptions fields (substrate, steps, binarization, ...)."""
    request = pb.ExplainRequest(
        model_name=model, model_version=version,
        image=image if isinstance(image, pb.Image) else pb.Image(encoded=image),
        target_classes=targets or [], top_k=top_k, method=METHODS[method],
        black_box=pb.BlackBoxOptions(num_masks=num_masks, seed=seed),
        map_format=MAP_FORMATS[map_format], metrics=list(metrics or []),
        metric_options=pb.MetricOptions(**(metric_options or {})),
        thresholds=thresholds or {})
    if label is not None:
        request.ground_truth.label = label
        request.ground_truth.has_label = True
    for x_min, y_min, x_max, y_max in boxes:
        request.ground_truth.boxes.add(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)
    if mask is not None:
        request.ground_truth.mask_png = mask
    return request


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                               "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The token on every call of a channel, so that stubs used directly carry it as well."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details) -> _CallDetails:
        return _CallDetails(
            details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


class XaiClient:
    def __init__(self, address: str, timeout: float = 120.0,
                 max_message_bytes: int = 64 * 1024 * 1024, own_connection: bool = False,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 retries: int = 4):
        self.channel = open_channel(address, max_message_bytes, own_connection, credentials,
                                    retries)
        if token:
            self.channel = grpc.intercept_channel(self.channel, BearerToken(token))
        self.stub = pb_grpc.ExplanationServiceStub(self.channel)
        self.kserve = kserve_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout = timeout

    @classmethod
    def connect(cls, address: str, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                tls_key: Path | None = None, token_file: Path | None = None,
                access: ServerAccess | None = None, **options) -> "XaiClient":
        """TLS when any of the TLS files is given (mutual with cert + key); the token from
        `token_file` or $XAISERVE_TOKEN; or all of it as `access`, read before."""
        access = access or ServerAccess.read(tls_ca, tls_cert, tls_key, token_file)
        return cls(address, credentials=access.credentials(), token=access.token, **options)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def model_info(self, model: str, version: str = "") -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(model_name=model, model_version=version),
                                   timeout=self.timeout)

    def explain(self, image: bytes | Path | pb.Image, model: str, *, version: str = "",
                targets: list[int] | None = None, top_k: int = 1, method: str = "auto",
                map_format: str = "overlay", num_masks: int = 0, seed: int = 0,
                label: int | None = None, boxes: list[tuple[float, float, float, float]] = (),
                mask: bytes | Path | None = None, metrics: list[str] = (),
                metric_options: dict | None = None,
                thresholds: dict[str, float] | None = None) -> pb.ExplainResponse:
        request = self.request(image, model, version=version, targets=targets, top_k=top_k,
                               method=method, map_format=map_format, num_masks=num_masks,
                               seed=seed, label=label, boxes=boxes, mask=mask, metrics=metrics,
                               metric_options=metric_options, thresholds=thresholds)
        return self.stub.Explain(request, timeout=self.timeout)

    @staticmethod
    def request(image: bytes | Path | pb.Image, model: str, *, mask: bytes | Path | None = None,
                **options) -> pb.ExplainRequest:
        """The ExplainRequest `explain` sends (options: explain's), files read here
        (ValueError naming the file when one cannot be)."""
        if isinstance(image, Path) or isinstance(mask, Path):
            from .images import read_image_file  # OpenCV and Pillow only when files are read

            image = read_image_file(image) if isinstance(image, Path) else image
            mask = read_image_file(mask) if isinstance(mask, Path) else mask
        return explain_request(image, model, mask=mask, **options)

    def explain_stream(self, requests: Iterable[pb.ExplainRequest]
                       ) -> Iterator[pb.ExplainStreamResponse]:
        """One ExplainStream: the answers in the order of `requests`, which are read as the
        stream takes them (a generator can read images while earlier ones are explained).
        No deadline: a stream lasts as long as its requests."""
        return self.stub.ExplainStream(iter(requests))

    def repository_index(self, ready_only: bool = False) -> list:
        """Every version the server's repository holds (name, version, state, reason)."""
        return list(self.kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=ready_only),
                                                timeout=self.timeout).models)

    def load_model(self, model: str) -> None:
        """Ask the server to scan its repository now; returns once the model's newest version
        serves (grpc.RpcError with the reason otherwise)."""
        self.kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=model),
                                        timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()
