"""Where `evaluate` gets logits and saliency maps: an IR compiled in this process, or a server.

Both answer the same call, `infer(u8 [N, H, W, 3] at the model's size) -> {"logits",
"saliency_map"}`, so the per-image evaluation is one function whatever runs the model. A
`BackendSpec` is a small picklable description, so a Ray worker can open its own backend (one
compiled model per worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .model import SALIENCY_OUTPUT
from .model_info import ModelInfo
from .security import ServerAccess

LOGITS_OUTPUT = "logits"


class BackendError(RuntimeError):
    """The model cannot be reached or loaded; the message names the option to change."""


class Backend(Protocol):
    info: ModelInfo
    has_saliency: bool

    def infer(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]: ...


class LocalBackend:
    def __init__(self, model_path: str, device: str = "CPU", version: str = ""):
        from .layout import resolve_version_dir
        from .model import ClassifierModel, ModelLoadError, error_reason

        try:
            self.model = ClassifierModel(resolve_version_dir(Path(model_path), version),
                                         device).load()
        except (FileNotFoundError, ModelLoadError) as exc:
            raise BackendError(str(exc)) from None
        except RuntimeError as exc:  # OpenVINO: a device that is not here, or cannot compile
            raise BackendError(f"--device {device}: {error_reason(exc)}") from None
        self.info = self.model.info
        self.has_saliency = self.model.has_saliency

    def infer(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        return self.model.predict(np.ascontiguousarray(batch), outputs)


READY_WAIT_S = 30.0  # a server started beside the evaluation may still be loading its models


class RemoteBackend:
    """KServe v2 ModelInfer for the numbers (raw u8 tensors, no re-encoding), the explanation
    service's ModelInfo for labels and preprocessing."""

    def __init__(self, address: str, model: str, version: str = "", chunk: int = 16,
                 access: ServerAccess = ServerAccess()):
        import grpc

        from .client import XaiClient

        try:
            self.client = XaiClient.connect(address, access=access)
        except ValueError as exc:  # a port outside 1..65535
            raise BackendError(str(exc)) from None
        self.model, self.version, self.chunk = model, version, chunk
        try:
            self.client.wait_ready(timeout=READY_WAIT_S)
            meta = self.client.model_info(model, version)
        except grpc.FutureTimeoutError:
            raise BackendError(f"--server {address}: no server answers there (waited "
                               f"{READY_WAIT_S:g} s)") from None
        except grpc.RpcError as exc:
            asked = f"--model {model}" + (f" --version {version}" if version else "")
            raise BackendError(f"{asked}: {exc.code().name}: {exc.details()}") from None
        if not meta.ready:
            raise BackendError(f"--model {model}: not ready on the server ({meta.reason})")
        self.info = ModelInfo(labels=list(meta.labels), input_height=int(meta.input_height),
                              input_width=int(meta.input_width),
                              mean_values=list(meta.mean_values),
                              scale_values=list(meta.scale_values),
                              resize_type=meta.resize_type or "standard",
                              embedded_processing=True,
                              saliency_method=meta.saliency_method or None)
        self.has_saliency = bool(meta.saliency_method)
        self.kserve = self.client.kserve

    def infer(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        parts = [self._infer(batch[i:i + self.chunk], outputs)
                 for i in range(0, len(batch), self.chunk)]
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}

    def _infer(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        from .proto import grpc_predict_v2_pb2 as kpb

        request = kpb.ModelInferRequest(model_name=self.model, model_version=self.version)
        request.inputs.add(name="image", datatype="UINT8", shape=list(batch.shape))
        request.raw_input_contents.append(np.ascontiguousarray(batch, np.uint8).tobytes())
        for name in outputs:
            request.outputs.add(name=name)
        response = self.kserve.ModelInfer(request, timeout=self.client.timeout)
        return {out.name: np.frombuffer(raw, np.float32).reshape(list(out.shape))
                for out, raw in zip(response.outputs, response.raw_output_contents)}


@dataclass(frozen=True)
class BackendSpec:
    """How to reach the model: `model_path` (in-process) or `server` + `model`."""

    model_path: str | None = None
    server: str | None = None
    model: str | None = None
    version: str = ""
    device: str = "CPU"
    access: ServerAccess = ServerAccess()  # with `server`: TLS files and token

    def open(self) -> Backend:
        if self.server:
            if not self.model:
                raise BackendError("--model NAME is needed with --server")
            return RemoteBackend(self.server, self.model, self.version, access=self.access)
        if not self.model_path:
            raise BackendError("give --model-path models/NAME or --server HOST:PORT --model NAME")
        return LocalBackend(self.model_path, self.device, self.version)


__all__ = ["Backend", "BackendError", "BackendSpec", "LocalBackend", "RemoteBackend",
           "LOGITS_OUTPUT", "SALIENCY_OUTPUT"]
