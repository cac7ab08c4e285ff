"""xaiserve's typed explanation service: predictions, maps, metrics and timings per request."""

from __future__ import annotations

import threading
import time

import cv2
import grpc
import numpy as np

from . import faithfulness as fm
from . import request_metrics as rm
from .config import ServerSettings
from .errors import busy, client_gone, exhausted, invalid, rpc, shown
from .explanation_quality import (QualityError, QualityRequest, model_scorer, quality_metrics,
                                  resolve_names)
from .images import ImageError, as_rgb, check_image_size, decode_image, resize_for_model
from .kserve import served_version
from .map_formats import to_png_heatmap, to_png_overlay, to_u8_image
from .message_stream import CallerStream, MessageStreams, StreamAnswers
from .model import SALIENCY_OUTPUT
from .proto import xaiserve_pb2 as pb
from .proto import xaiserve_pb2_grpc as pb_grpc
from .repository import ModelRepository, VersionState
from .request_context import ClientGone, ClientWait, new_request_id, note_forward_passes
from .response_cache import CachedAnswers, ResponseCache
from .rise import RiseExplainer, RiseSettings
from .shared_interest import Binarization, PatternCutoffs
from .shared_memory import SharedMemoryRegions, TensorPlace
from .summary_head import CONCENTRATION_TOP_FRACTION, COVERAGE_THRESHOLD, TOP_K, Summary

MAX_TOP_K = TOP_K  # the classes the summary head ranks
# Faithfulness costs about 2 * (steps + 1) + 3 inferences per request.
MAX_FAITHFULNESS_STEPS = 256
MAX_POINTING_TOLERANCE_PX = 512
PATTERN_CUTOFF_NAMES = ("iou_high", "gtc_high", "sc_high")
THRESHOLD_NAMES = ("high_confidence", "competing_margin") + PATTERN_CUTOFF_NAMES
BLACK_BOX_SLOT_WAIT_S = 30
MAX_BOXES = 1000  # ground-truth boxes per request: their loops are Python


class Stopwatch:
    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now

    def move(self, source: str, target: str, ms: float) -> None:
        """Count `ms` of `source` (lapped or still running) as `target` instead."""
        self.timings[source] = self.timings.get(source, 0.0) - ms
        self.timings[target] = self.timings.get(target, 0.0) + ms

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": (time.perf_counter() - self._start) * 1e3}


def mark_cache_hit(response: pb.ExplainResponse, ms: float) -> None:
    """A cached answer: an id of its own when the request gave none, the lookup's timings."""
    response.id = response.id or new_request_id()
    response.timings_ms.clear()
    response.timings_ms["cache"] = ms
    response.timings_ms["total"] = ms


def decode_encoded(data: bytes, field: str) -> np.ndarray:
    try:
        return decode_image(data)
    except ImageError as exc:
        raise invalid(f"{field}: {exc}") from None


def decode_pixels(shape: list[int], data: bytes, field: str, data_field: str) -> np.ndarray:
    """u8 [H, W, 3] RGB of any size within the image limits; `field` holds the shape."""
    if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
        raise invalid(f"{field}.shape {shape}: expected [H, W, 3] u8 RGB")
    try:
        check_image_size(shape[0], shape[1])
    except ImageError as exc:
        raise invalid(f"{field}.shape {shape}: {exc}") from None
    if len(data) != shape[0] * shape[1] * 3:
        raise invalid(f"{data_field}: {len(data)} bytes for shape {shape}")
    return np.frombuffer(data, np.uint8).reshape(shape)


def decode_request_image(image: pb.Image, shared: SharedMemoryRegions) -> np.ndarray:
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return decode_encoded(image.encoded, "image.encoded")
    if kind == "tensor":
        return decode_pixels(list(image.tensor.shape), image.tensor.data, "image.tensor",
                             "image.tensor.data")
    if kind == "shared_memory":
        source, field = image.shared_memory, "image.shared_memory"
        data = shared.read(TensorPlace(source.region, source.offset, source.byte_size), field)
        if not source.shape:
            return decode_encoded(data, field)
        return decode_pixels(list(source.shape), data, field, f"{field}.byte_size")
    raise invalid("image: set image.encoded (JPEG/PNG bytes), image.tensor (u8 [H, W, 3]) or "
                  "image.shared_memory")


# Enum fields hold any number on the wire; one this server does not know is an error, not a
# silent default. Their known values, read once from the protocol.
KNOWN_CHOICES = {field: {number: value.name for number, value in
                         pb.ExplainRequest.DESCRIPTOR.fields_by_name[field]
                         .enum_type.values_by_number.items()}
                 for field in ("method", "map_format")}


def check_choices(request: pb.ExplainRequest) -> None:
    for field, names in KNOWN_CHOICES.items():
        value = getattr(request, field)
        if value not in names:
            raise invalid(f"{field} {value}: unknown; expected one of {', '.join(names.values())}")


def decode_mask(data: bytes, height: int, width: int) -> np.ndarray:
    try:
        mask = decode_image(data, cv2.IMREAD_GRAYSCALE)
    except ImageError as exc:
        raise invalid(f"ground_truth.mask_png: {exc}") from None
    if mask.shape != (height, width):
        raise invalid(f"ground_truth.mask_png: {mask.shape[1]}x{mask.shape[0]} does not match "
                      f"the image's {width}x{height}; send a mask of the image's size")
    return mask > 0


def stream_reply(response: pb.ExplainResponse) -> pb.ExplainStreamResponse:
    return pb.ExplainStreamResponse(response=response, id=response.id)


def stream_failure(request: pb.ExplainRequest | None, code: grpc.StatusCode, message: str
                   ) -> pb.ExplainStreamResponse:
    return pb.ExplainStreamResponse(id=request.id if request is not None else "",
                                    error_code=code.name, error_message=message)


class ExplanationServicer(pb_grpc.ExplanationServiceServicer):
    def __init__(self, repository: ModelRepository, settings: ServerSettings,
                 streams: MessageStreams | None = None,
                 shared_memory: SharedMemoryRegions | None = None,
                 answers: CachedAnswers | None = None):
        self.repository = repository
        self.streams = streams
        self.shared_memory = shared_memory or SharedMemoryRegions(enabled=False)
        self.answers = answers or CachedAnswers(ResponseCache(0), lambda name: False)
        self.rise = RiseExplainer()
        self.raise_black_box_cap(settings)
        self.black_box_slots = threading.BoundedSemaphore(settings.max_black_box_in_flight)

    @property
    def settings(self) -> ServerSettings:
        """The repository's: per-model settings change when the config is reloaded."""
        return self.repository.settings

    def raise_black_box_cap(self, settings: ServerSettings) -> None:
        """RISE's own cap: the largest per-model `max_black_box_masks` (each request is checked
        against its model's)."""
        self.rise.max_masks = max([settings.defaults.max_black_box_masks]
                                  + [m.max_black_box_masks for m in settings.models.values()])

    @rpc
    def ModelInfo(self, request, context):
        state = self.repository.state(request.model_name, request.model_version)
        response = pb.ModelInfoResponse(
            model_name=request.model_name, model_version=str(state.version),
            versions=[str(v) for v in self.repository.versions(request.model_name)],
            ready=state.ready, reason=state.error or ("" if state.ready else "loading"),
            device=(state.settings or self.settings.for_model(state.name)).device)
        if state.ready:
            info = state.model.info
            response.labels.extend(info.labels)
            response.input_height, response.input_width = info.input_height, info.input_width
            response.mean_values.extend(info.mean_values)
            response.scale_values.extend(info.scale_values)
            response.resize_type = info.resize_type
            response.saliency_method = info.saliency_method or ""
            response.saliency_target_layer = info.saliency_target_layer or ""
        return response

    @rpc
    def Explain(self, request, context):
        watch = Stopwatch()
        state = served_version(self.repository, request.model_name, request.model_version)
        check_choices(request)

        def compute() -> pb.ExplainResponse:
            with state.statistics.measure() as split:
                response = self._explain(request, state, watch, context)
                split.timings_ms = dict(response.timings_ms)
            return response
        return self.answers.answer(
            "Explain", state, request, request.image.WhichOneof("source") == "shared_memory",
            pb.ExplainResponse, compute, mark_cache_hit)

    def ExplainStream(self, requests: CallerStream, context):
        """Explain per message of one stream, answered in order (service.message_stream)."""
        if self.streams is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server takes no streams; send "
                          "Explain calls")
        return self.streams.answer(requests, context, StreamAnswers(
            "ExplainStream", self.Explain, stream_reply, stream_failure))

    def _explain(self, request, state: VersionState, watch: Stopwatch, context
                 ) -> pb.ExplainResponse:
        model = state.model
        image = as_rgb(decode_request_image(request.image, self.shared_memory))
        watch.lap("decode")
        tensor = resize_for_model(image, model.info)
        watch.lap("preprocess")
        white_box = self._white_box(request, model)
        waited: dict[str, float] = {}
        # The scores' summary and the map statistics come from the graph (service.summary_head).
        out = model.predict(tensor[None], model.explain_outputs(white_box), timings=waited)
        watch.lap("inference")
        watch.move("inference", "queue", waited["queue"])
        summary = Summary.read(out)
        probabilities = summary.probabilities
        targets = self._targets(request, summary, len(model.info.labels) or len(probabilities))
        self._check_map_bytes(request, image, len(targets))
        maps, method = self._maps(request, state, tensor, out, targets, white_box, watch,
                                  context)
        watch.lap("explanation")

        response = pb.ExplainResponse(id=request.id or new_request_id(),
                                      model_name=request.model_name,
                                      model_version=str(state.version))
        for c in summary.order(max(5, len(targets))):
            response.predictions.add(class_id=c, label=model.label(c),
                                     score=float(probabilities[c]))
        for c, saliency in zip(targets, maps):
            self._add_map(response, request, image, saliency, c, model.label(c), method,
                          float(probabilities[c]))
        watch.lap("encode_maps")
        self._add_metrics(response, request, summary, maps, targets)
        if maps:
            self._add_quality_metrics(response, request, image, tensor, model, maps[0],
                                      targets[0], summary.top_classes[0], context)
        watch.lap("metrics")
        response.timings_ms.update(watch.total())
        return response

    # --- pieces ---------------------------------------------------------------------------

    def _targets(self, request, summary: Summary, num_classes: int) -> list[int]:
        """The explicit target classes, or the top_k classes by score."""
        if request.target_classes:
            if len(request.target_classes) > MAX_TOP_K:
                raise invalid(f"target_classes: {len(request.target_classes)} classes, over "
                              f"{MAX_TOP_K} per request; split the request")
            for i, c in enumerate(request.target_classes):
                if not 0 <= c < num_classes:
                    raise invalid(f"target_classes[{i}] = {c} is out of range [0, {num_classes})")
            return [int(c) for c in request.target_classes]
        k = request.top_k or 1
        if k > MAX_TOP_K:
            raise invalid(f"top_k {k} is over {MAX_TOP_K}")
        return summary.order(k)

    def _check_map_bytes(self, request, image: np.ndarray, maps: int) -> None:
        """u8 maps at the image's size have a known size: a response that cannot be sent is
        refused before they are made (20 maps of a 36-megapixel image: 720 MB). The other
        formats are checked once built, by the interceptor."""
        if request.map_format != pb.MAP_FORMAT_U8_IMAGE:
            return
        size = maps * image.shape[0] * image.shape[1]
        if size > self.settings.max_message_bytes:
            raise exhausted(f"map_format U8_IMAGE: {maps} maps of {image.shape[1]}x"
                            f"{image.shape[0]} are {size} bytes, over the server's "
                            f"max_message_bytes of {self.settings.max_message_bytes}; ask for "
                            "fewer target_classes or top_k, or map_format FLOAT")

    @staticmethod
    def _white_box(request, model) -> bool:
        """Whether the maps come from the model's saliency_map output (else from RISE)."""
        if request.method == pb.METHOD_WHITE_BOX and not model.has_saliency:
            raise invalid("method WHITE_BOX: this model has no saliency_map output; use "
                          "METHOD_BLACK_BOX or export it with `xaiserve export`")
        return request.method == pb.METHOD_WHITE_BOX or (
            request.method == pb.METHOD_AUTO and model.has_saliency)

    def _maps(self, request, state, tensor, out, targets, white_box: bool, watch: Stopwatch,
              context) -> tuple[list[np.ndarray], str]:
        model = state.model
        if white_box:
            saliency = out[SALIENCY_OUTPUT][0]
            method = model.info.saliency_method or "white-box"
            return [saliency[c if saliency.shape[0] > 1 else 0] for c in targets], method
        limits = self.settings.for_model(request.model_name)
        options = request.black_box
        masks = options.num_masks or limits.black_box_masks
        if masks > limits.max_black_box_masks:
            raise exhausted(f"black_box.num_masks {masks} is over this server's cap of "
                            f"{limits.max_black_box_masks}; ask for fewer masks")
        try:
            settings = RiseSettings(num_masks=masks, cells=options.cells or RiseSettings.cells,
                                    seed=int(options.seed))
        except ValueError as exc:
            raise invalid(f"black_box: {exc}") from None
        started = time.perf_counter()
        client = ClientWait.of(context)  # only long work asks whether the client still waits
        self._take_black_box_slot(client, "black-box explanations")
        watch.move("explanation", "queue", (time.perf_counter() - started) * 1e3)
        try:
            result = self.rise.run(model.masked_scoring(), tensor, targets, settings,
                                   deadline=client.deadline, cancel=client.ended)
        except ValueError as exc:  # settings that do not fit this model, e.g. cells
            raise invalid(f"black_box: {exc}") from None
        except ClientGone as exc:  # RiseAborted
            raise client_gone(exc.reason, "the black-box explanation") from None
        finally:
            self.black_box_slots.release()
        note_forward_passes(result.forward_passes)
        return list(result.maps), "rise"

    def _take_black_box_slot(self, client: ClientWait, work: str) -> None:
        if not client.acquire(self.black_box_slots, BLACK_BOX_SLOT_WAIT_S):
            if client.gone():
                raise client_gone(client.gone(), f"waiting for a slot for {work}")
            raise busy(f"the server is running its maximum of {work}")

    def _add_map(self, response, request, image, saliency, class_id, label, method, score):
        entry = response.maps.add(class_id=class_id, label=label, method=method,
                                  format=request.map_format)
        h, w = image.shape[:2]
        if request.map_format == pb.MAP_FORMAT_FLOAT:
            entry.shape.extend(saliency.shape)
            entry.values.extend(saliency.astype(np.float32).ravel().tolist())
        elif request.map_format == pb.MAP_FORMAT_U8_IMAGE:
            entry.shape.extend([h, w])
            entry.data = to_u8_image(saliency, h, w).tobytes()
        elif request.map_format == pb.MAP_FORMAT_PNG_HEATMAP:
            entry.shape.extend([h, w])
            entry.data = to_png_heatmap(saliency, h, w)
        else:
            entry.shape.extend([h, w])
            entry.data = to_png_overlay(saliency, image, [f"{label}: {score:.2f}"])

    def _add_metrics(self, response, request, summary: Summary, maps, targets) -> None:
        def add(name, value=0.0, text="", **parameters):
            response.metrics.add(name=name, value=float(value), text=text).parameters.update(
                {k: str(v) for k, v in parameters.items()})

        probabilities = summary.probabilities
        add("top1_confidence", summary.top1_confidence, score="softmax")
        add("margin", summary.margin, score="softmax")
        add("entropy", summary.entropy, unit="nats")
        if maps:
            coverage, concentration = summary.map_statistics(targets[0], maps[0])
            add("coverage", coverage, threshold=COVERAGE_THRESHOLD, of="peak", target="first")
            add("concentration", concentration, top_fraction=CONCENTRATION_TOP_FRACTION,
                target="first")
        truth = request.ground_truth
        if truth.has_label:
            try:
                thresholds = rm.CaseThresholds(
                    **{k: request.thresholds[k] for k in ("high_confidence", "competing_margin")
                       if k in request.thresholds})
            except ValueError as exc:
                raise invalid(f"thresholds: {exc}") from None
            if not 0 <= truth.label < len(probabilities):
                raise invalid(f"ground_truth.label {truth.label} is out of range "
                              f"[0, {len(probabilities)})")
            add("prediction_case", 0.0, rm.prediction_case(probabilities, int(truth.label),
                                                           thresholds),
                high_confidence=thresholds.high_confidence,
                competing_margin=thresholds.competing_margin)

    @staticmethod
    def _check_threshold_names(request) -> None:
        for key in request.thresholds:
            if key not in THRESHOLD_NAMES:
                raise invalid(f"thresholds[{shown(key)}]: unknown; expected one of "
                              f"{', '.join(THRESHOLD_NAMES)}")

    @staticmethod
    def _asks_quality(request) -> bool:
        """Whether the request asks for anything `_add_quality_metrics` computes; a plain
        Explain skips building its settings (tens of microseconds on a cache that the
        inference has just emptied)."""
        truth = request.ground_truth
        return bool(request.metrics or truth.boxes or truth.mask_png
                    or request.HasField("metric_options")
                    or any(key in request.thresholds for key in PATTERN_CUTOFF_NAMES))

    def _quality_request(self, request, image) -> QualityRequest:
        """The request's ground truth and metric options as library settings; bad values become
        INVALID_ARGUMENT naming the field."""
        truth, options = request.ground_truth, request.metric_options
        if len(truth.boxes) > MAX_BOXES:
            raise invalid(f"ground_truth.boxes: {len(truth.boxes)} boxes, over {MAX_BOXES}; "
                          "merge them into ground_truth.mask_png")
        mask = decode_mask(truth.mask_png, *image.shape[:2]) if truth.mask_png else None
        if options.steps > MAX_FAITHFULNESS_STEPS:
            raise exhausted(f"metric_options.steps {options.steps} is over this server's cap of "
                            f"{MAX_FAITHFULNESS_STEPS}; ask for fewer steps")
        if options.pointing_tolerance_px > MAX_POINTING_TOLERANCE_PX:
            raise invalid(f"metric_options.pointing_tolerance_px {options.pointing_tolerance_px}"
                          f": expected 0..{MAX_POINTING_TOLERANCE_PX}")
        try:
            binarization = Binarization(
                options.binarization or "std",
                options.binarization_value if options.HasField("binarization_value") else None)
        except ValueError as exc:
            raise invalid(f"metric_options: {exc}") from None
        try:
            cutoffs = PatternCutoffs(**{k: request.thresholds[k] for k in PATTERN_CUTOFF_NAMES
                                        if k in request.thresholds})
        except ValueError as exc:
            raise invalid(f"thresholds: {exc}") from None
        try:
            settings = fm.FaithfulnessSettings(steps=options.steps or fm.FaithfulnessSettings.steps,
                                               blur_kernel=options.blur_kernel)
            if options.substrate:
                settings = settings.with_substrate(options.substrate)
        except ValueError as exc:
            raise invalid(f"metric_options: {exc}") from None
        return QualityRequest(
            names=list(request.metrics),
            boxes=[(b.x_min, b.y_min, b.x_max, b.y_max) for b in truth.boxes], mask=mask,
            label=int(truth.label) if truth.has_label else None, binarization=binarization,
            cutoffs=cutoffs, faithfulness=settings,
            pointing_tolerance_px=int(options.pointing_tolerance_px))

    def _add_quality_metrics(self, response, request, image, tensor, model, saliency,
                             class_id: int, predicted: int, context) -> None:
        """Shared Interest and pointing game with ground truth; faithfulness when asked, its
        extra inferences batched and counted against the black-box slots."""
        self._check_threshold_names(request)
        if not self._asks_quality(request):
            return
        quality = self._quality_request(request, image)
        try:
            heavy = bool(resolve_names(quality.names)[0])
        except QualityError as exc:
            raise invalid(str(exc)) from None
        scorer = model_scorer(model)
        if heavy:
            client = ClientWait.of(context)
            self._take_black_box_slot(client, "black-box explanations and faithfulness metrics")
            scorer = client.watching(scorer)  # no more curve batches for a client gone
        try:
            values = quality_metrics(quality, image, tensor, saliency, class_id, predicted,
                                     scorer, model.info)
        except QualityError as exc:
            raise invalid(str(exc)) from None
        except ClientGone as exc:
            raise client_gone(exc.reason, "the faithfulness metrics") from None
        finally:
            if heavy:
                self.black_box_slots.release()
        for value in values:
            metric = response.metrics.add(name=value.name, value=value.value, text=value.text)
            metric.parameters.update(value.parameters)
