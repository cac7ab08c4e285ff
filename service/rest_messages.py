"""HTTP bodies of the Open Inference Protocol's REST side <-> its gRPC messages.

An inference request is JSON (`{"inputs": [{"name", "shape", "datatype", "data"}]}`), or JSON
followed by the tensors' bytes (Triton's binary tensor data extension, which tritonclient.http,
KServe's InferenceRESTClient and perf_analyzer send by default): the header
`Inference-Header-Content-Length` gives the JSON's length and each input's
`parameters.binary_data_size` its share of the bytes after it. Both become the
`ModelInferRequest` that the gRPC side decodes, so one decoder checks every request."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from .errors import invalid, shown
from .kserve import bytes_tensor, split_bytes_tensor
from .proto import grpc_predict_v2_pb2 as pb
from .shared_memory import REGION

HEADER_LENGTH = "inference-header-content-length"
# the protocol's tensor datatypes and their element types (BYTES is length-prefixed strings)
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
# what an input or output may say in its parameters about how its data travels
TRANSPORT_PARAMETERS = ("binary_data", "binary_data_size", "content_type")
MAX_BYTES_ITEMS = 1 << 20  # a BYTES output's elements read back for JSON


@dataclass
class InferCall:
    """An inference request read from HTTP, and how its client wants the outputs back."""

    request: pb.ModelInferRequest
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # by output name
    binary_by_default: bool = False  # the request's parameters.binary_data_output

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_by_default)


def message_json(message: Message) -> dict:
    """A protocol message as the REST side writes it: field names as in the .proto, 64-bit
    integers as JSON numbers (proto3's JSON quotes them; Triton's REST side does not)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def parse_message(body: bytes, message: Message, what: str) -> Message:
    """`message` filled from a proto3 JSON body (empty: left as it is)."""
    if not body.strip():
        return message
    try:
        return json_format.Parse(body, message)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid(f"the {what} body: {str(exc)[:300]}; send the request message as JSON "
                      "in UTF-8 (protos/, field names as there)") from None


def _parameter(value, where: str, kind: type = pb.InferParameter):
    """A JSON parameter value as the protocol's parameter message `kind`."""
    choice = ("bool_param" if isinstance(value, bool)
              else "int64_param" if isinstance(value, int) and -2**63 <= value < 2**63
              else "double_param" if isinstance(value, float)
              else "string_param" if isinstance(value, str) else None)
    if choice is None or choice not in kind.DESCRIPTOR.fields_by_name:
        raise invalid(f"{where} {shown(value)}: a parameter here is a boolean, an integer"
                      f"{', a number' if 'double_param' in kind.DESCRIPTOR.fields_by_name else ''}"
                      " or a string")
    return kind(**{choice: value})


def parameter_value(parameter: pb.InferParameter):
    return getattr(parameter, parameter.WhichOneof("parameter_choice") or "string_param")


def _object(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _copy_parameters(values: dict, into, where: str) -> None:
    for key, value in values.items():
        if key not in TRANSPORT_PARAMETERS and key != "binary_data_output":
            into[key].CopyFrom(_parameter(value, f"{where}.{key}"))


def parse_repository_request(body: bytes, message: Message, model: str) -> Message:
    """Triton's REST body of a model load or unload, `{"parameters": {key: value}}`, as the
    gRPC request (whose parameters are typed messages)."""
    header = read_header(body, None)[0] if body.strip() else {}
    for key, value in _object(header.get("parameters"), "parameters").items():
        message.parameters[key].CopyFrom(
            _parameter(value, f"parameters.{key}", pb.ModelRepositoryParameter))
    message.model_name = model
    return message


def read_header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON object at the start of an inference body, and the bytes after it."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 < size <= len(body):
            raise invalid(f"header Inference-Header-Content-Length {shown(header_length)}: "
                          f"give the length of the JSON at the start of the {len(body)}-byte "
                          "body")
    try:
        header = json.loads(bytes(body[:size]))
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise invalid(f"the request body is not JSON ({exc}); send a JSON object as the Open "
                      "Inference Protocol's REST side describes it (an inference request: "
                      "{\"inputs\": [...]}, with Inference-Header-Content-Length when binary "
                      "tensor data follows)") from None
    if not isinstance(header, dict):
        raise invalid(f"the request body: a JSON object expected, got {type(header).__name__}")
    return header, memoryview(body)[size:]


def parse_infer(body: bytes, header_length: str | None, model: str, version: str) -> InferCall:
    """An inference body (JSON, or JSON then binary tensor data) as a ModelInferRequest."""
    header, binary = read_header(body, header_length)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(f"id {shown(request_id)}: a string, echoed in the response")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    parameters = _object(header.get("parameters"), "parameters")
    _copy_parameters(parameters, request.parameters, "parameters")
    call = InferCall(request, binary_by_default=parameters.get("binary_data_output") is True)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("inputs: a list of tensors expected ({\"name\", \"shape\", \"datatype\", "
                      "\"data\"})")
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        item = _object(item, where)
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise invalid(f"{where}: give \"name\" and \"datatype\" as strings")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63
                           for d in shape)):
            raise invalid(f"{where}.shape {shown(shape)}: a list of non-negative integers")
        item_parameters = _object(item.get("parameters"), f"{where}.parameters")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        _copy_parameters(item_parameters, tensor.parameters, f"{where}.parameters")
        if "binary_data_size" in item_parameters:
            size = item_parameters["binary_data_size"]
            if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                    or offset + size > len(binary)):
                raise invalid(f"{where}.parameters.binary_data_size {shown(size)}: "
                              f"{len(binary) - offset} bytes of binary data are left after "
                              "the JSON")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            request.raw_input_contents.append(
                json_tensor(item["data"], datatype, item_parameters.get("content_type"),
                            f"{where}.data"))
        elif REGION not in item_parameters:  # in shared memory: read where the gRPC side does
            raise invalid(f"{where}: no data; give \"data\", parameters.binary_data_size or "
                          f"parameters.{REGION}")
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes after the JSON are not claimed by any "
                      "input's parameters.binary_data_size")
    for i, item in enumerate(_list(header.get("outputs"), "outputs")):
        where = f"outputs[{i}]"
        item = _object(item, where)
        name = item.get("name")
        if not isinstance(name, str):
            raise invalid(f"{where}.name: a string, one of the model's outputs")
        item_parameters = _object(item.get("parameters"), f"{where}.parameters")
        output = request.outputs.add(name=name)
        _copy_parameters(item_parameters, output.parameters, f"{where}.parameters")
        if "binary_data" in item_parameters:
            call.binary_outputs[name] = item_parameters["binary_data"] is True
    return call


def _list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"{where}: a list expected, got {type(value).__name__}")
    return value


def json_tensor(data, datatype: str, content_type, where: str) -> bytes:
    """A tensor's JSON `data` (flat or nested, row-major) in the protocol's raw byte layout."""
    if datatype == "BYTES":
        items = (np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list)
                 else [data])
        if not all(isinstance(item, str) for item in items):
            raise invalid(f"{where}: BYTES elements are strings (base64 with "
                          "parameters.content_type \"base64\")")
        if content_type == "base64":
            try:
                return bytes_tensor([base64.b64decode(item, validate=True) for item in items])
            except binascii.Error:
                raise invalid(f"{where}: an element is not base64") from None
        return bytes_tensor([item.encode() for item in items])
    if datatype not in DTYPES:
        raise invalid(f"{where}: datatype {shown(datatype)} is not one of the protocol's "
                      f"({', '.join([*DTYPES, 'BYTES'])})")
    dtype = np.dtype(DTYPES[datatype])
    try:
        values = np.asarray(data)
    except ValueError:
        raise invalid(f"{where}: nested lists of unequal lengths, or nested deeper than an "
                      "array can be; send the tensor's values flat, in row-major order") from None
    if values.dtype.kind not in "biuf":
        raise invalid(f"{where}: numbers expected for a {datatype} tensor")
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if values.size and (values.dtype.kind == "f" or values.min() < limits.min
                            or values.max() > limits.max):
            raise invalid(f"{where}: {datatype} values are integers from {limits.min} to "
                          f"{limits.max}")
    return values.astype(dtype).ravel().tobytes()


def infer_body(response: pb.ModelInferResponse, call: InferCall) -> tuple[bytes, int | None]:
    """The response's body, and the length of its JSON when binary tensor data follows."""
    header = {"model_name": response.model_name, "model_version": response.model_version,
              "id": response.id,
              "parameters": {k: parameter_value(v) for k, v in response.parameters.items()}}
    outputs, chunks = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if REGION in output.parameters:
            pass  # written into the client's shared memory: no data, and as Triton no
            # parameters (perf_analyzer reads binary_data_size from any it finds)
        elif call.binary(output.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif output.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", "replace")
                             for item in split_bytes_tensor(raw, MAX_BYTES_ITEMS)]
        else:
            entry["data"] = np.frombuffer(raw, dtype=DTYPES[output.datatype]).tolist()
        outputs.append(entry)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)
