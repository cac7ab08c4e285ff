"""What `xaiserve bench` measures: kinds of work, each in-process and through a running server.

A work kind makes one *call* per load client: a function that does one request and returns the
request's own timings in ms (a `Stages` dict). The measuring loop times the call from outside;
whatever the stages do not cover is reported as "other" (in-process) or "transport" (client
latency minus the server's total). New kinds register in WORKS; nothing else changes.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .client import XaiClient, explain_request
from .images import decode_image, resize_for_model
from .model import SALIENCY_OUTPUT, ClassifierModel
from .proto import grpc_predict_v2_pb2 as kpb
from .request_metrics import softmax
from .rest_client import RestClient
from .security import ServerAccess
from .rise import RiseExplainer, RiseSettings

Stages = dict[str, float]
Call = Callable[[], Stages]
# Names of the Explain request's `metrics` field that ask for every extra metric (protos/).
FAITHFULNESS_METRICS = ("all",)


@dataclass(frozen=True)
class WorkInput:
    """The request content shared by all clients: one real photo, JPEG-encoded, and options."""

    jpeg: bytes
    masks: int = 500
    seed: int = 0


@dataclass(frozen=True)
class RemoteTarget:
    address: str  # HOST:PORT
    model: str
    version: str = ""
    input_hw: tuple[int, int] = (224, 224)
    # "grpc-stream": gRPC, each client's requests over one stream; "http" or "https": the
    # server's REST side (service.rest)
    protocol: str = "grpc"
    access: ServerAccess = ServerAccess()  # TLS files and token

    def rest_client(self, timeout: float = 600.0) -> RestClient | None:
        """A client of the REST side; None when the target is the gRPC side."""
        if self.protocol.startswith("grpc"):
            return None
        return RestClient(self.address, timeout, self.access, tls=self.protocol == "https")

    def grpc_client(self, **options) -> XaiClient:
        """A client of the gRPC side on its own connection, without retries (a benchmark's
        load counts failures, not hides them)."""
        return XaiClient.connect(self.address, access=self.access, own_connection=True,
                                 retries=0, **options)


class Timer:
    """Laps in ms into a Stages dict."""

    def __init__(self, stages: Stages):
        self.stages = stages
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now

    def skip(self) -> None:
        """Start the next lap now: what ran since recorded its own stages."""
        self._last = time.perf_counter()


class Unsupported(ValueError):
    """This work cannot run on this model, in this mode or with this batch; says why."""


def sample_jpeg(size: int = 0) -> tuple[bytes, str]:
    """A real photo as JPEG (quality 90): scikit-image's cat when scikit-image is installed,
    else a smooth synthetic picture (said so in the description). `size` > 0 resizes it to
    size x size; 0 keeps the photo's own 451 x 300."""
    try:
        import skimage.data
        rgb, what = skimage.data.chelsea(), "scikit-image chelsea"
    except ImportError:
        y, x = np.mgrid[0:300, 0:451]
        rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
        what = "synthetic gradient (scikit-image not installed)"
    if size > 0:
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return data.tobytes(), f"{what}, {rgb.shape[1]}x{rgb.shape[0]} JPEG"


# --- in-process --------------------------------------------------------------------------------

def _model_tensor(model: ClassifierModel, work: WorkInput, batch: int) -> np.ndarray:
    image = resize_for_model(decode_image(work.jpeg), model.info)
    return np.ascontiguousarray(np.broadcast_to(image, (batch, *image.shape)))


def local_predict(model: ClassifierModel, work: WorkInput, batch: int) -> Call:
    """The compiled model alone on a ready u8 batch: logits only."""
    tensor = _model_tensor(model, work, batch)

    def call() -> Stages:
        stages: Stages = {}
        model.predict(tensor, ("logits",), stages)
        return stages
    return call


def _decode_batch(model: ClassifierModel, work: WorkInput, batch: int, timer: Timer
                  ) -> np.ndarray:
    images = [decode_image(work.jpeg) for _ in range(batch)]
    timer.lap("decode")
    tensor = np.stack([resize_for_model(image, model.info) for image in images])
    timer.lap("preprocess")
    return tensor


def local_explain_white(model: ClassifierModel, work: WorkInput, batch: int) -> Call:
    """What the server's Explain does around the model, without gRPC or map encoding:
    decode, resize, infer with the saliency output, top-1 class and its map."""
    if not model.has_saliency:
        raise Unsupported("the model has no saliency_map output (export it with the exporter)")

    def call() -> Stages:
        stages: Stages = {}
        timer = Timer(stages)
        tensor = _decode_batch(model, work, batch, timer)
        out = model.predict(tensor, ("logits", SALIENCY_OUTPUT), stages)
        timer.skip()  # predict recorded queue and inference
        top = np.argmax(softmax(out["logits"].astype(np.float64)), axis=1)
        saliency = out[SALIENCY_OUTPUT]
        _ = saliency[np.arange(len(top)), top if saliency.shape[1] > 1 else 0].copy()
        timer.lap("explanation")
        return stages
    return call


def local_explain_black(model: ClassifierModel, work: WorkInput, batch: int) -> Call:
    """RISE with `masks` masks on the top-1 class, as the server runs it."""
    rise = RiseExplainer()
    settings = RiseSettings(num_masks=work.masks, seed=work.seed)

    def call() -> Stages:
        stages: Stages = {}
        timer = Timer(stages)
        tensor = _decode_batch(model, work, 1, timer)
        out = model.predict(tensor, ("logits",), stages)
        timer.skip()  # predict recorded queue and inference
        target = int(np.argmax(out["logits"][0]))
        rise.explain(model.masked_scoring(), tensor[0], [target], settings)
        timer.lap("explanation")
        return stages
    return call


# --- through a server --------------------------------------------------------------------------

class StreamFailed(RuntimeError):
    """A stream's answer that carries an error instead of a response (counted as an error)."""


class StreamCall:
    """A load client's stream with one request in flight, as perf_analyzer --streaming: each
    call sends the request and waits for its answer. `close` ends the stream and its
    connection (the server caps open streams)."""

    def __init__(self, client: XaiClient, method, request, failed: Callable[[object], str],
                 stages: Callable[[object], Stages]):
        self.client, self.request, self.failed, self.stages = client, request, failed, stages
        self.outbox: queue.Queue = queue.Queue()
        self.answers = method(iter(self.outbox.get, None))

    def __call__(self) -> Stages:
        self.outbox.put(self.request)
        answer = next(self.answers)
        error = self.failed(answer)
        if error:
            raise StreamFailed(error)
        return self.stages(answer)

    def close(self) -> None:
        self.outbox.put(None)
        self.client.close()


def _infer_split(response: kpb.ModelInferResponse) -> Stages:
    """The server's split of a ModelInfer, from its `<stage>_ms` parameters."""
    return {name[:-3]: p.double_param for name, p in response.parameters.items()
            if name.endswith("_ms")}


def _explain_call(target: RemoteTarget, work: WorkInput, method: str,
                  metrics: tuple[str, ...] = ()) -> Call:
    """One Explain per call on the client's own connection; the server's timings_ms come back."""
    request = explain_request(work.jpeg, target.model, version=target.version, method=method,
                              map_format="float", num_masks=work.masks, seed=work.seed,
                              metrics=list(metrics))
    rest = target.rest_client()
    if rest is not None:
        return lambda: dict(rest.explain(request)["timings_ms"])
    client = target.grpc_client(timeout=600)
    if target.protocol == "grpc-stream":
        return StreamCall(client, client.stub.ExplainStream, request,
                          lambda a: a.error_code and f"{a.error_code}: {a.error_message}",
                          lambda a: dict(a.response.timings_ms))

    def call() -> Stages:
        return dict(client.stub.Explain(request, timeout=client.timeout).timings_ms)
    return call


def remote_predict(target: RemoteTarget, work: WorkInput, batch: int) -> Call:
    """KServe v2 ModelInfer with a u8 [batch, H, W, 3] tensor in raw_input_contents; the
    server's split comes back as `<stage>_ms` response parameters."""
    image = cv2.resize(decode_image(work.jpeg), target.input_hw[::-1],
                       interpolation=cv2.INTER_AREA)
    tensor = np.ascontiguousarray(np.broadcast_to(image, (batch, *image.shape)))
    request = kpb.ModelInferRequest(model_name=target.model, model_version=target.version)
    request.inputs.add(name="image", datatype="UINT8", shape=list(tensor.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(tensor.tobytes())
    rest = target.rest_client()
    if rest is not None:
        return lambda: {name[:-3]: value for name, value in rest.infer(request)["parameters"]
                        .items() if name.endswith("_ms")}
    client = target.grpc_client()
    if target.protocol == "grpc-stream":
        return StreamCall(client, client.kserve.ModelStreamInfer, request,
                          lambda a: a.error_message, lambda a: _infer_split(a.infer_response))
    return lambda: _infer_split(client.kserve.ModelInfer(request, timeout=600))


def remote_explain_white(target: RemoteTarget, work: WorkInput, batch: int) -> Call:
    return _explain_call(target, work, "white-box")


def remote_explain_black(target: RemoteTarget, work: WorkInput, batch: int) -> Call:
    return _explain_call(target, work, "black-box")


def remote_faithfulness(target: RemoteTarget, work: WorkInput, batch: int) -> Call:
    """A white-box Explain that also asks for every extra metric (`metrics: ["all"]`)."""
    return _explain_call(target, work, "white-box", FAITHFULNESS_METRICS)


# --- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkKind:
    name: str
    description: str
    local: Callable[[ClassifierModel, WorkInput, int], Call] | None
    remote: Callable[[RemoteTarget, WorkInput, int], Call] | None
    local_batches: bool = True  # False: one image per request in-process
    remote_batches: bool = True  # False: one image per request over gRPC
    black_box: bool = False  # one request runs masks + 1 inferences
    # False: the server decides how many inferences a request runs (the faithfulness curves),
    # so no benchmark_app ratio is given rather than a misleading one.
    known_inferences: bool = True

    def inferences(self, batch: int, masks: int) -> int | None:
        """Model inferences (images through the network) in one request; None: not known here."""
        if not self.known_inferences:
            return None
        return masks + 1 if self.black_box else batch

    def skip_reason(self, mode: str, batch: int) -> str | None:
        """None when (mode, batch) can run; else the reason, for the skip line."""
        maker = self.local if mode == "in-process" else self.remote
        if maker is None:
            return f"{self.name} {mode}: {NOT_THERE[self.name]}"
        batched = self.local_batches if mode == "in-process" else self.remote_batches
        if batch > 1 and not batched:
            where = "an Explain request" if mode == "server" else "this work"
            return f"{self.name} {mode} batch {batch}: {where} takes one image (use --batch 1)"
        return None


NOT_THERE = {"faithfulness": "the faithfulness metrics are computed by the server only; "
                             "use --server"}

WORKS: dict[str, WorkKind] = {w.name: w for w in (
    WorkKind("predict", "class scores only (KServe ModelInfer over gRPC or REST)",
             local_predict, remote_predict),
    WorkKind("explain-white", "scores and the in-graph saliency map of the top class",
             local_explain_white, remote_explain_white, remote_batches=False),
    WorkKind("explain-black", "scores and a RISE map (--masks masks) of the top class",
             local_explain_black, remote_explain_black, local_batches=False,
             remote_batches=False, black_box=True),
    WorkKind("faithfulness", "white-box Explain with every extra metric (metrics: all)",
             None, remote_faithfulness, remote_batches=False, known_inferences=False),
)}
