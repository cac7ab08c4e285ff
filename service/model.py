"""A served classifier with a clear lifecycle: load, preprocess, predict, explain.

One object per model version. Inference goes through OpenVINO's async infer-request pool, so
several callers can use one compiled model at once without a global lock.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from .batching import BatchingPool, add_timings
from .cpu_int8 import cpu_flags, int8_dot_product, saturating_layers, saturation_warning
from .images import resize_for_model
from .model_info import ModelInfo
from .rise_graph import MaskedScoring, class_count, masked_scoring_graph
from .summary_head import LOGITS_OUTPUT, MAP_OUTPUTS, SCORE_OUTPUTS, Summary, with_summary

SALIENCY_OUTPUT = "saliency_map"
# Saliency methods whose maps a reduced default precision destroys, so the copies that compute
# them are compiled in f32 unless the operator chose a precision. ViT-ReciproCAM reads the class
# score of copies of the last block that differ in one token; the class token's residual stream
# carries nearly all of the score, and bf16's 8 significant bits round the differences away: on
# an f32 ViT-Tiny IR (timm, 224 px) run in bf16, the top class's map was zero everywhere for two
# photos of four and ranked 0.07 and 0.20 with the f32 map for the others (a ResNet, ConvNeXt,
# Swin and Lite0 with ReciproCAM: 0.994 to 1). The copies without the branch (predictions) keep
# the device's default.
MAP_NEEDS_F32 = frozenset({"vit-reciprocam"})
# Masked images per inference of the RISE copy, by default (a fixed batch in the IR is kept).
# 1000 masks of EfficientNet-Lite0 on 2 vCPUs of an AMX Xeon: 1.41 s at 8, 1.60 s at 1.
RISE_BATCH = 8

# pybind11's one-time numpy setup inside OpenVINO can deadlock when several threads reach it
# at once (seen with concurrent first inferences); touching a tensor's data here, at import on
# one thread, runs it before any request thread exists. Warm-ups are serialised for the same
# reason, since models load in parallel threads.
ov.Tensor(np.zeros((1,), np.uint8)).data
_WARM_UP_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    pass


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """The line of an exception that says what went wrong. OpenVINO's messages begin with
    where they were raised ("Exception from src/...", "Check '...' failed at ...") and end
    with the cause ("Incorrect weights in bin file!")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (causes or lines or [type(exc).__name__])[-1][:limit]


def read_ir(core: ov.Core, xml: Path) -> ov.Model:
    """An IR read from memory, its weights a copy the model owns. `Core.read_model(path)` maps
    the `.bin` file, and a process serving a mapped file dies (SIGBUS) when the file is
    truncated or rewritten on disk, as copying a new version over an old one does; it also asks
    every frontend whether the file is theirs, and TensorFlow's prints parse errors on stderr
    for a corrupt one."""
    weights_file = xml.with_suffix(".bin")
    weights = (np.fromfile(weights_file, np.uint8) if weights_file.exists()
               else np.empty(0, np.uint8))  # an IR without constants has no .bin
    return core.read_model(xml.read_text(), ov.Tensor(weights))


@dataclass
class Prediction:
    class_id: int
    label: str
    score: float


@dataclass
class Explanation:
    """Predictions for one image and one saliency map per target class (float, [h, w], 0..1)."""

    predictions: list[Prediction]
    maps: dict[int, np.ndarray]
    probabilities: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Routes:
    """Extra compiled copies of a model, each for the requests it serves fastest.

    - `scores_only`: predictions that do not ask for the saliency map run a copy whose saliency
      branch is cut away (the branch costs 10-20% of a small CNN's inference).
    - `latency_when_idle`: a single image arriving while the model has nothing in flight runs on
      a batch-1 copy compiled with the LATENCY hint, which uses every core for that one image;
      under load the THROUGHPUT copy's streams keep the cores busy instead.
    - `batch_when_busy`: on the THROUGHPUT copies, requests that wait for a busy model run
      together, up to this many images per inference (service.batching; 0: never).
    - `single_image_copies`: where the IR's batch is dynamic, single images (the common
      request) run on copies compiled with the batch fixed at 1;
      OpenVINO's CPU plugin runs a static shape faster (EfficientNet-Lite0 here: 187 against
      174 FPS in benchmark_app, 6.3 against 6.8 ms at batch 1). Batches of several images keep
      the dynamic copies. Not with `batch_when_busy`, which needs the dynamic batch.
    - `black_box_batch`: masked images per inference of RISE's copy (`masked_scoring`), where
      the IR's batch is dynamic; compiled on the first black-box request, not at load, with
      the THROUGHPUT hint where the model's is LATENCY (1000 masks on 2 vCPUs of the AMX
      Xeon: 1.28 s against 1.37 s).
    Each copy costs a compile at load (0.15 s for Lite0) and its own weights in memory (about
    30 MB for Lite0)."""

    scores_only: bool = False
    latency_when_idle: bool = False
    batch_when_busy: int = 0
    single_image_copies: bool = False
    black_box_batch: int = RISE_BATCH


def queued_requests(compiled: ov.CompiledModel) -> int:
    """Twice the device's optimal number of infer requests: each stream then has a request
    queued while the caller's thread copies the previous outputs or prepares the next inputs;
    with only the optimal number, streams sit idle between requests."""
    try:
        optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception:  # noqa: BLE001 - some plugins do not report it
        optimal = 1
    return 2 * max(1, optimal)


def compiled_precision(compiled: ov.CompiledModel) -> str:
    """The precision the device computes the non-INT8 layers in ("f32", "bf16", ...), which
    may differ from the one asked for (a CPU without bf16 computes f32); "unknown" where the
    plugin does not say."""
    try:
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # noqa: BLE001 - some plugins do not report it
        return "unknown"
    return precision.get_type_name() if isinstance(precision, ov.Type) else str(precision)


class InferPool:
    """One compiled model and a pool of its infer requests: callers on different requests run
    in parallel; no lock is held while inferring."""

    def __init__(self, compiled: ov.CompiledModel, size: int):
        self.compiled = compiled
        self.size = size
        self._free: queue.Queue = queue.Queue()  # idle infer requests
        for _ in range(size):
            self._free.put(compiled.create_infer_request())

    @classmethod
    def sized_for(cls, compiled: ov.CompiledModel) -> "InferPool":
        return cls(compiled, queued_requests(compiled))

    @contextmanager
    def request(self):
        request = self._free.get()
        try:
            yield request
        finally:
            self._free.put(request)

    def run(self, batch: np.ndarray, outputs: tuple[str, ...],
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        asked = time.perf_counter()
        with self.request() as request:
            started = time.perf_counter()
            # Shared: the caller's array is read in place and the outputs are copied below once.
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True, share_outputs=True)
            result = {name: request.get_tensor(name).data.copy() for name in outputs}
        add_timings(timings, asked, started, time.perf_counter())
        return result


def with_batch(model: ov.Model, batch: int) -> ov.Model:
    """A copy of the graph with its batch fixed at `batch`."""
    fixed = model.clone()
    shape = fixed.inputs[0].get_partial_shape()
    shape[0] = batch
    fixed.reshape({0: shape})
    return fixed


def single_image(model: ov.Model) -> ov.Model:
    """A copy of the graph with its batch fixed at 1 (the input is NHWC u8)."""
    return with_batch(model, 1)


def without_saliency(model: ov.Model) -> ov.Model:
    """The same graph with only the class scores as output: OpenVINO drops every node that
    no remaining output needs, so the saliency branch is not computed."""
    results = [r for r in model.get_results()
               if SALIENCY_OUTPUT not in r.output(0).get_names()
               and SALIENCY_OUTPUT not in r.input_value(0).get_names()]
    pruned = ov.Model(results, model.get_parameters(), model.get_friendly_name())
    for key in ("model_info",):
        if model.has_rt_info(key):
            pruned.set_rt_info(model.get_rt_info(key), key)
    return pruned


class ClassifierModel:
    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None,
                 core: ov.Core | None = None, routes: Routes = Routes()):
        self.path = Path(path)
        self.device = device
        self.config = config or {}
        self.core = core or ov.Core()
        self.routes = routes
        self.compiled: ov.CompiledModel | None = None
        self.info: ModelInfo | None = None
        self.warnings: list[str] = []  # found at load, for the operator's log
        self.inference_precision = "unknown"  # what the device computes in, once loaded
        self.map_inference_precision = "unknown"  # the same for the copies with the map
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._scores_graph: ov.Model | None = None
        self._masked_scoring: MaskedScoring | None = None
        self._masked_scoring_lock = threading.Lock()

    def load(self) -> "ClassifierModel":
        xml = self.path if self.path.suffix == ".xml" else self.path / "model.xml"
        try:
            model = read_ir(self.core, xml)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{xml}: cannot read the IR ({error_reason(exc, 160)})") from None
        info = ModelInfo.from_model(model)
        if info is None or not info.embedded_processing:
            raise ModelLoadError(f"{xml}: no embedded preprocessing in model_info; export it with "
                                 "`xaiserve export`")
        self.info = info
        scores_graph = without_saliency(model)  # the class scores alone
        self._scores_graph = scores_graph  # RISE's copy is built from it on first use
        warning = saturation_warning(saturating_layers(scores_graph),
                                     int8_dot_product(cpu_flags()), self.device)
        self.warnings = [warning] if warning else []
        # The copies with the saliency branch compute a white-box explanation's summary in
        # their graph (service.summary_head); the others, and RISE's thousand inferences on
        # them, are left as they are.
        full_model = with_summary(model, LOGITS_OUTPUT, SALIENCY_OUTPUT) if any(
            SALIENCY_OUTPUT in out.get_names() for out in model.outputs) else model
        map_config = self._config_for_maps(info.saliency_method)
        self.compiled = self._compile(full_model, map_config)
        self.map_inference_precision = compiled_precision(self.compiled)
        self.output_names = {name for out in self.compiled.outputs for name in out.get_names()}
        summary = tuple(n for n in SCORE_OUTPUTS + MAP_OUTPUTS if n in self.output_names)
        self._explain_outputs = {False: (LOGITS_OUTPUT,),
                                 True: (summary or (LOGITS_OUTPUT,)) + (SALIENCY_OUTPUT,)}
        batch_dim = self.compiled.inputs[0].get_partial_shape()[0]
        # the IR's own batch size where it is fixed (a request may not carry more images)
        self.static_batch = batch_dim.get_length() if batch_dim.is_static else None
        self._full = self._pool(self.compiled, "full")
        self.num_requests = self._full.size
        scores_model = scores_graph if self.routes.scores_only and self.has_saliency else None
        self._scores = self._pool(self._compile(scores_model), "scores") if scores_model \
            else self._full
        self.inference_precision = compiled_precision(self._scores.compiled)
        self._full_single, self._scores_single = self._full, self._scores
        if (self.routes.single_image_copies and self.static_batch is None
                and self.routes.batch_when_busy <= 1):
            self._full_single = InferPool.sized_for(self._compile(single_image(full_model),
                                                                  map_config))
            self._scores_single = InferPool.sized_for(self._compile(single_image(scores_model))) \
                if scores_model else self._full_single
        self._latency = None
        if self.routes.latency_when_idle and self.config.get("PERFORMANCE_HINT") != "LATENCY":
            # Two requests: a second image that arrives at the same moment need not wait.
            self._latency = InferPool(self._compile(
                single_image(full_model), {**map_config, "PERFORMANCE_HINT": "LATENCY"}), 2)
        self._warm_up()
        return self

    def _config_for_maps(self, method: str | None) -> dict:
        """The compile settings of the copies that compute the saliency map: the model's, with
        f32 added for a method in MAP_NEEDS_F32 where the operator left the precision to the
        device and the device computes f32; a warning where the operator asked otherwise."""
        if method not in MAP_NEEDS_F32:
            return self.config
        asked = self.config.get("INFERENCE_PRECISION_HINT")
        if asked is not None:
            if str(asked).lower() not in ("f32", "fp32"):
                self.warnings.append(
                    f"inference_precision {asked}: {method} maps computed in reduced precision "
                    "can be flat (the score differences they read are rounded away); leave it "
                    "at default, which computes the map in f32 and predictions at the device's "
                    "own precision")
            return self.config
        try:
            capabilities = self.core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
        except Exception:  # noqa: BLE001 - a device that does not say: leave it its default
            return self.config
        return {**self.config, "INFERENCE_PRECISION_HINT": "f32"} \
            if "FP32" in capabilities else self.config

    def _compile(self, model: ov.Model, config: dict | None = None) -> ov.CompiledModel:
        return self.core.compile_model(model, self.device, self.config if config is None
                                       else config)

    def _pool(self, compiled: ov.CompiledModel, name: str) -> "InferPool | BatchingPool":
        pool = InferPool.sized_for(compiled)
        batch_dim = compiled.inputs[0].get_partial_shape()[0]
        if self.routes.batch_when_busy > 1 and batch_dim.is_dynamic:
            return BatchingPool(compiled, pool.size, self.routes.batch_when_busy,
                                f"{self.path.name}-{name}")
        return pool

    def close(self) -> None:
        """Stop the batching threads (an unloaded version would otherwise keep them)."""
        for pool in (self._full, self._scores):
            if isinstance(pool, BatchingPool):
                pool.close()

    def masked_scoring(self) -> MaskedScoring:
        """The copy RISE runs on (service.rise_graph): it masks the image and sums the weighted
        masks inside the graph, `routes.black_box_batch` masks per inference (or the IR's fixed
        batch). Compiled on the first black-box request, not at load: most models never get
        one, and it costs a compile and a copy of the weights."""
        with self._masked_scoring_lock:
            if self._masked_scoring is None:
                info, graph = self.info, self._scores_graph
                batch = self.static_batch or self.routes.black_box_batch
                # A thousand inferences per request: throughput, whatever the model's hint.
                config = {**self.config, "PERFORMANCE_HINT": "THROUGHPUT"} \
                    if self.config.get("PERFORMANCE_HINT") == "LATENCY" else None
                compiled = self._compile(masked_scoring_graph(
                    graph, batch, info.input_height, info.input_width), config)
                scoring = MaskedScoring(compiled, batch, info.input_height, info.input_width,
                                        class_count(graph))
                with _WARM_UP_LOCK:  # see _warm_up
                    compiled.create_infer_request().infer([
                        np.zeros((info.input_height, info.input_width, 3), np.uint8),
                        np.zeros((batch, info.input_height, info.input_width), np.float16),
                        np.zeros((1,), np.int64)])
                self._masked_scoring = scoring
            return self._masked_scoring

    def _warm_up(self) -> None:
        """One inference per compiled copy on one thread before any request: the first calls of
        several threads at once can hang in OpenVINO 2026.4, and the first call is slow anyway."""
        info = self.info
        image = np.zeros((1, info.input_height, info.input_width, 3), np.uint8)
        with _WARM_UP_LOCK:
            pools = (self._full, self._scores, self._full_single, self._scores_single,
                     self._latency)
            for pool in {id(p): p for p in pools if p}.values():
                pool.run(image, ("logits",))

    def _route(self, batch: np.ndarray, outputs: tuple[str, ...], idle: bool) -> InferPool:
        single = len(batch) == 1
        if idle and single and self._latency is not None:
            return self._latency
        if SALIENCY_OUTPUT not in outputs:
            return self._scores_single if single else self._scores
        return self._full_single if single else self._full

    @property
    def has_saliency(self) -> bool:
        return SALIENCY_OUTPUT in self.output_names

    def explain_outputs(self, white_box: bool) -> tuple[str, ...]:
        """What an explanation reads (service.summary_head.Summary.read). White-box: the map and
        the summary its graph computes (the logits where it could not). Black-box: the logits
        alone, from the copy without the saliency branch; RISE's maps take seconds, so the
        summary's 0.3 ms in numpy does not matter there. Both are fixed when the model loads."""
        return self._explain_outputs[white_box]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return resize_for_model(image, self.info)

    def predict(self, batch: np.ndarray, outputs: tuple[str, ...] | None = None,
                timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """u8 [N, H, W, 3] -> {"logits": [N, K], "saliency_map": [N, K, h, w] if present};
        `outputs` limits what is computed and copied out. `timings` (ms) gets "queue" (waiting
        for a free infer request, or for a batch to start) and "inference" added to it."""
        wanted = outputs or (("logits", SALIENCY_OUTPUT) if self.has_saliency else ("logits",))
        with self._in_flight_lock:
            idle = self._in_flight == 0
            self._in_flight += 1
        try:
            return self._route(batch, wanted, idle).run(batch, wanted, timings)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def explain(self, image: np.ndarray, top_k: int = 1) -> Explanation:
        t0 = time.perf_counter()
        tensor = self.preprocess(image)[None]
        t1 = time.perf_counter()
        stages: dict[str, float] = {}
        out = self.predict(tensor, self.explain_outputs(self.has_saliency), timings=stages)
        t2 = time.perf_counter()
        summary = Summary.read(out)
        probs = summary.probabilities
        order = summary.order(max(top_k, 1))
        predictions = [Prediction(c, self.label(c), float(probs[c])) for c in order]
        maps = {}
        if self.has_saliency:
            saliency = out[SALIENCY_OUTPUT][0]
            for c in order[:top_k]:
                maps[c] = saliency[c if saliency.shape[0] > 1 else 0]
        return Explanation(predictions, maps, probs, {
            "preprocess": (t1 - t0) * 1e3, "queue": stages["queue"],
            "inference": (t2 - t1) * 1e3 - stages["queue"],
        })

    def label(self, class_id: int) -> str:
        labels = self.info.labels
        return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)
