"""A small client of the server's REST side (service.rest), for `xaiserve bench --server
http[s]://HOST:PORT`: one keep-alive HTTP connection, and requests built from the same protocol
messages the gRPC side takes (ModelInferRequest with Triton's binary tensor data, the
ExplainRequest as proto3 JSON), so a bench point over REST does the same work as over gRPC."""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote, urlsplit

from google.protobuf import json_format

from .proto import grpc_predict_v2_pb2 as pb
from .proto import xaiserve_pb2 as xpb
from .rest_messages import HEADER_LENGTH, read_header
from .security import ServerAccess

SCHEMES = ("http://", "https://")


class RestError(RuntimeError):
    """A REST call answered with an error status; `message` is the server's."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def rest_address(url: str) -> str | None:
    """"HOST:PORT" of an http:// or https:// URL ("" when it lacks one); None for anything
    else (a gRPC address)."""
    if not url.startswith(SCHEMES):
        return None
    parts = urlsplit(url)
    return parts.netloc if parts.hostname and parts.port else ""


class RestClient:
    """`tls`: HTTPS, trusting and presenting what `access` holds; its token goes with every
    call."""

    def __init__(self, address: str, timeout: float = 600.0,
                 access: ServerAccess = ServerAccess(), tls: bool = False):
        host, _, port = address.rpartition(":")
        if tls:
            self.connection = http.client.HTTPSConnection(
                host.strip("[]"), int(port), timeout=timeout, context=access.ssl_context())
        else:
            self.connection = http.client.HTTPConnection(host.strip("[]"), int(port),
                                                         timeout=timeout)
        self.headers = access.headers()

    def call(self, verb: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        """The response's body and headers (lower-case names); RestError for an error status."""
        self.connection.request(verb, path, body=body or None,
                                headers={**self.headers, **(headers or {})})
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload[:300].decode("utf-8", "replace")
            raise RestError(response.status, message)
        return payload, {k.lower(): v for k, v in response.getheaders()}

    def get(self, path: str) -> dict:
        return json.loads(self.call("GET", path)[0])

    def infer(self, request: pb.ModelInferRequest) -> dict:
        """ModelInfer with its tensors as binary data both ways; the response's JSON part."""
        inputs = [{"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
                   "parameters": {"binary_data_size": len(raw)}}
                  for t, raw in zip(request.inputs, request.raw_input_contents)]
        header = json.dumps({"id": request.id, "inputs": inputs,
                             "outputs": [{"name": o.name} for o in request.outputs],
                             "parameters": {"binary_data_output": True}}).encode()
        body, headers = self.call("POST", model_path(request.model_name, request.model_version,
                                                     "infer"),
                                  b"".join([header, *request.raw_input_contents]),
                                  {HEADER_LENGTH: str(len(header))})
        return read_header(body, headers.get(HEADER_LENGTH))[0]

    def explain(self, request: xpb.ExplainRequest) -> dict:
        body = json_format.MessageToJson(request, preserving_proto_field_name=True).encode()
        return json.loads(self.call("POST", model_path(request.model_name, request.model_version,
                                                       "explain"), body,
                                    {"content-type": "application/json"})[0])

    def close(self) -> None:
        self.connection.close()


def model_path(model: str, version: str = "", suffix: str = "") -> str:
    path = f"/v2/models/{quote(model, safe='')}" + (
        f"/versions/{quote(version, safe='')}" if version else "")
    return f"{path}/{suffix}" if suffix else path
