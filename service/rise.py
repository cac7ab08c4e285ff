"""RISE: black-box saliency for models that have no in-graph `saliency_map` output.

RISE (Petsiuk et al., BMVC 2018) needs only forward passes: it scores the image under N random
smooth masks and averages the masks weighted by the target's score,
S_c = 1 / (N p) * sum_i f_c(x * M_i) M_i. It is the fallback that works for any classifier, at the
price of N inferences, so this module is built around keeping those inferences cheap:

* masks depend only on (H, W, settings), so they are generated once and kept in a small LRU cache;
* masked images go through the model in batches on an `AsyncInferQueue`, so every stream is busy;
* the weighted sum is one matmul, scores [N, T]^T x masks [N, H*W], not a Python loop;
* given a `MaskedScoring` copy (service.rise_graph, what the server uses), the masking and the
  weighted sum run inside the compiled model too, so the request's thread only feeds masks.

Nothing here imports torch: it runs on the serving side next to the compiled OpenVINO model.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import openvino as ov

from .model import queued_requests
from .request_metrics import softmax
from .request_context import ClientGone, abort_reason
from .rise_graph import IMAGE as GRAPH_IMAGE
from .rise_graph import MASKS as GRAPH_MASKS
from .rise_graph import TARGETS as GRAPH_TARGETS
from .rise_graph import MaskedScoring
from .summary_head import LOGITS_OUTPUT

DEFAULT_MAX_MASKS = 10_000
MAX_CELLS = 64
MAX_BATCH_SIZE = 256
IMAGE_INPUT = "image"
# Masks are multiplied into float32 this many at a time when accumulating, so that float16 masks
# are never widened all at once (1000 x 224 x 224 float32 would be 200 MB).
ACCUMULATE_CHUNK = 256


class RiseAborted(ClientGone):
    """The deadline passed or the caller cancelled before all masked images were scored."""


@dataclass(frozen=True)
class RiseSettings:
    """How many masks, how coarse, how dense; the seed makes maps reproducible and cacheable."""

    num_masks: int = 1000
    cells: int = 8
    p_keep: float = 0.5
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        # Checks that hold for every server; the per-server cap is `validate(max_masks)`.
        _check_int("num_masks", self.num_masks, 1)
        _check_int("cells", self.cells, 1, MAX_CELLS)
        _check_int("seed", self.seed, 0)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if isinstance(self.p_keep, bool) or not isinstance(self.p_keep, (int, float)):
            raise ValueError(f"p_keep must be a number, got {type(self.p_keep).__name__}")
        if not 0.0 < float(self.p_keep) < 1.0:  # also rejects NaN
            raise ValueError(f"p_keep {self.p_keep} is outside (0, 1)")

    def validate(self, max_masks: int = DEFAULT_MAX_MASKS) -> "RiseSettings":
        """Apply the server's cap on inferences per request; returns self for chaining."""
        if self.num_masks > max_masks:
            raise ValueError(f"num_masks {self.num_masks} is over the server cap {max_masks}")
        return self

    def check_image(self, height: int, width: int) -> None:
        """A grid finer than the image has cells smaller than a pixel: reject it."""
        if self.cells > min(height, width):
            raise ValueError(f"cells {self.cells} is more than the image side "
                             f"{min(height, width)}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} {value} is outside {bound}")


# --------------------------------------------------------------------------------------- masks

def generate_masks(height: int, width: int, settings: RiseSettings,
                   dtype: type = np.float16) -> np.ndarray:
    """RISE masks [N, H, W] in [0, 1]: binary s x s grids, bilinear upsampling, random shift.

    Upsampling to (s + 1) * cell and cropping at a random offset within one cell makes the mask
    edges fall anywhere, not only on the grid lines, so the map is not blocky.
    """
    s, n = settings.cells, settings.num_masks
    rng = np.random.default_rng(settings.seed)
    grids = (rng.random((n, s, s)) < settings.p_keep).astype(np.float32)
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    up_h, up_w = (s + 1) * cell_h, (s + 1) * cell_w
    shift_y = rng.integers(0, cell_h, size=n)
    shift_x = rng.integers(0, cell_w, size=n)
    masks = np.empty((n, height, width), dtype=dtype)
    for i in range(n):
        up = cv2.resize(grids[i], (up_w, up_h), interpolation=cv2.INTER_LINEAR)
        masks[i] = up[shift_y[i]:shift_y[i] + height, shift_x[i]:shift_x[i] + width]
    return masks


MaskKey = tuple[int, int, int, int, float, int]


def mask_key(height: int, width: int, settings: RiseSettings) -> MaskKey:
    """Everything the masks depend on; batch_size is not part of it."""
    return (height, width, settings.num_masks, settings.cells, float(settings.p_keep),
            settings.seed)


class MaskCache:
    """A small thread-safe LRU of read-only mask stacks, bounded in entries and bytes.

    Generation runs outside the cache lock, under a per-key lock, so that a miss for one size does
    not stall hits for others and two concurrent misses for one key generate it only once. The
    byte bound matters: 10000 masks at 224 x 224 in float16 are 1 GB. The newest entry is always
    kept, even alone over the bound, since the request that made it is using it.
    """

    def __init__(self, max_entries: int = 4, max_bytes: int = 1 << 30):
        if max_entries < 1:
            raise ValueError(f"max_entries {max_entries} is below 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[MaskKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[MaskKey, threading.Lock] = {}

    def get(self, height: int, width: int, settings: RiseSettings) -> np.ndarray:
        key = mask_key(height, width, settings)
        masks = self._lookup(key, count=True)
        if masks is not None:
            return masks
        with self._key_lock(key):
            masks = self._lookup(key, count=False)  # another thread may have just made it
            if masks is None:
                masks = generate_masks(height, width, settings)
                masks.flags.writeable = False  # shared between requests
                self._store(key, masks)
        return masks

    def _lookup(self, key: MaskKey, count: bool) -> np.ndarray | None:
        with self._lock:
            masks = self._entries.get(key)
            if masks is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            elif count:
                self.misses += 1
            return masks

    def _key_lock(self, key: MaskKey) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _store(self, key: MaskKey, masks: np.ndarray) -> None:
        with self._lock:
            self._entries[key] = masks
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and (len(self._entries) > self.max_entries
                                              or self.nbytes > self.max_bytes):
                old, _ = self._entries.popitem(last=False)
                self._key_locks.pop(old, None)

    @property
    def nbytes(self) -> int:
        return sum(masks.nbytes for masks in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key_locks.clear()
            self.hits = self.misses = 0


DEFAULT_MASK_CACHE = MaskCache()


# --------------------------------------------------------------------------------- accumulation

def accumulate_saliency(scores: np.ndarray, masks: np.ndarray, p_keep: float,
                        chunk: int = ACCUMULATE_CHUNK) -> np.ndarray:
    """S[t] = 1 / (N p) * sum_i scores[i, t] * masks[i]: [N, T] x [N, H, W] -> [T, H, W] float32.

    One matmul per chunk of masks instead of N * T image-sized multiply-adds in Python.
    """
    n, h, w = masks.shape
    if scores.ndim != 2 or scores.shape[0] != n:
        raise ValueError(f"scores {scores.shape} do not match {n} masks")
    flat = masks.reshape(n, h * w)
    weights = np.ascontiguousarray(scores.T, dtype=np.float32)  # [T, N]
    total = np.zeros((weights.shape[0], h * w), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        total += weights[:, start:stop] @ flat[start:stop].astype(np.float32, copy=False)
    total /= n * float(p_keep)
    return total.reshape(-1, h, w)


def mask_images(image: np.ndarray, masks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """u8 [H, W, 3] x masks [B, H, W] -> u8 [B, H, W, 3], rounded because the model input is u8."""
    product = masks[..., None].astype(np.float32) * image.astype(np.float32)
    product += 0.5  # values are >= 0, so +0.5 then truncation rounds to nearest
    if out is None:
        return product.astype(np.uint8)
    np.copyto(out, product, casting="unsafe")
    return out


# -------------------------------------------------------------------------------------- explain

@dataclass
class RiseResult:
    """The maps and what they cost, so that the server can report and bill the inferences."""

    maps: np.ndarray  # float32 [T, H, W]
    targets: list[int]
    forward_passes: int  # masked images scored (zero padding of a static batch not counted)
    infer_requests: int
    batch_size: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def model_batch_size(compiled_model: ov.CompiledModel, wanted: int) -> int:
    """Batch images per request: `wanted` for a dynamic batch dim, else the static one."""
    dim = _image_input(compiled_model).get_partial_shape()[0]
    return wanted if dim.is_dynamic else int(dim.get_length())


def _image_input(compiled_model: ov.CompiledModel) -> ov.ConstOutput:
    return compiled_model.inputs[_image_index(compiled_model)]


def _image_index(compiled_model: ov.CompiledModel) -> int:
    return _port_index(compiled_model.inputs, IMAGE_INPUT)


def _logits_output(compiled_model: ov.CompiledModel) -> ov.ConstOutput:
    return compiled_model.outputs[_logits_index(compiled_model)]


def _logits_index(compiled_model: ov.CompiledModel) -> int:
    return _port_index(compiled_model.outputs, LOGITS_OUTPUT)


def _port_index(ports: list[ov.ConstOutput], name: str) -> int:
    """The port called `name`, else the first one (single-output models need no naming)."""
    for index, port in enumerate(ports):
        if name in port.get_names():
            return index
    return 0


def _target_scores(request: ov.InferRequest, output_index: int, count: int,
                   targets: np.ndarray) -> np.ndarray:
    """Softmax scores [count, T] of the targets from a finished request (padding rows dropped)."""
    logits = request.get_output_tensor(output_index).data[:count].astype(np.float32)
    return softmax(logits)[:, targets]


class RiseExplainer:
    """Runs RISE against a compiled OpenVINO classifier (u8 NHWC `image` in, `logits` out), or
    against its masked-scoring copy (`MaskedScoring`), which masks and sums in the graph.

    Stateless apart from the shared mask cache and a forward-pass counter, so one instance can
    serve concurrent requests; each call gets its own infer-request pool.
    """

    def __init__(self, cache: MaskCache | None = None, max_masks: int = DEFAULT_MAX_MASKS):
        self.cache = cache if cache is not None else DEFAULT_MASK_CACHE
        self.max_masks = max_masks
        self.total_forward_passes = 0
        self._count_lock = threading.Lock()

    def explain(self, model: ov.CompiledModel | MaskedScoring, image: np.ndarray,
                targets: list[int], settings: RiseSettings = RiseSettings(),
                deadline: float | None = None, cancel: threading.Event | None = None
                ) -> np.ndarray:
        """Saliency maps float32 [len(targets), H, W] for an image already at the input size."""
        return self.run(model, image, targets, settings, deadline, cancel).maps

    def run(self, model: ov.CompiledModel | MaskedScoring, image: np.ndarray,
            targets: list[int], settings: RiseSettings = RiseSettings(),
            deadline: float | None = None, cancel: threading.Event | None = None
            ) -> RiseResult:
        """Like `explain`, with forward-pass count and timings.

        `deadline` is a `time.monotonic()` instant; past it, or once `cancel` is set, no more
        batches are submitted and `RiseAborted` is raised after the in-flight ones finish.
        """
        settings.validate(self.max_masks)
        in_graph = isinstance(model, MaskedScoring)
        if in_graph:
            height, width = _check_graph_image(model, image)
            targets = _check_targets(targets, model.classes)
        else:
            height, width = _check_image(model, image)
            targets = _check_targets(targets, _class_count(model))
        settings.check_image(height, width)

        t0 = time.perf_counter()
        masks = self.cache.get(height, width, settings)
        t1 = time.perf_counter()
        if in_graph:
            batch = model.batch
            total, requests = _weigh_in_graph(model, image, masks, targets, deadline, cancel)
            t2 = time.perf_counter()
            maps = (total / (len(masks) * float(settings.p_keep))).reshape(-1, height, width)
        else:
            batch = model_batch_size(model, settings.batch_size)
            scores, requests = _score_masked(model, image, masks, targets, batch, deadline,
                                             cancel)
            t2 = time.perf_counter()
            maps = accumulate_saliency(scores, masks, settings.p_keep)
        t3 = time.perf_counter()

        with self._count_lock:
            self.total_forward_passes += len(masks)
        return RiseResult(maps, targets, len(masks), requests, batch, {
            "masks": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
            "accumulate": (t3 - t2) * 1e3,
        })


Feed = Callable[[int, int], dict]  # (first mask, count) -> the request's inputs
Collect = Callable[[ov.InferRequest, int, int], None]  # (finished request, first mask, count)


def _infer_batches(compiled: ov.CompiledModel, n: int, batch: int, feed: Feed,
                   collect: Collect, deadline: float | None,
                   cancel: threading.Event | None) -> int:
    """Submit N masks `batch` at a time on an `AsyncInferQueue`; returns the requests made.

    Results are read on this thread when a request is reused and after `wait_all`, not in a
    Python callback: OpenVINO finishes a Python callback on the model's executor thread,
    which needs the GIL after `wait_all` has returned, so a caller that then drops the last
    reference to the compiled model (joining that thread while holding the GIL) deadlocks or
    aborts. Without a Python callback the executor threads never touch Python.
    """
    queue = ov.AsyncInferQueue(compiled, queued_requests(compiled))
    pending: dict[int, tuple[int, int]] = {}  # request id -> (first mask, count)
    requests = 0
    aborted = ""
    for start in range(0, n, batch):
        aborted = abort_reason(deadline, cancel)
        if aborted:
            break
        count = min(batch, n - start)
        inputs = feed(start, count)
        request_id = queue.get_idle_request_id()  # waits for one to finish
        if request_id in pending:
            collect(queue[request_id], *pending.pop(request_id))
        queue.start_async(inputs)
        pending[request_id] = (start, count)
        requests += 1
    queue.wait_all()
    for request_id, (start, count) in pending.items():
        collect(queue[request_id], start, count)
    if aborted:
        raise RiseAborted(aborted, f"RISE {aborted} after {min(requests * batch, n)} of {n} "
                                   "masks")
    return requests


def _score_masked(compiled: ov.CompiledModel, image: np.ndarray, masks: np.ndarray,
                  targets: list[int], batch: int, deadline: float | None,
                  cancel: threading.Event | None) -> tuple[np.ndarray, int]:
    """Softmax scores [N, T] of the targets for every masked image, masked here in numpy."""
    static = _image_input(compiled).get_partial_shape()[0].is_static
    wanted = np.asarray(targets, dtype=np.int64)
    output_index = _logits_index(compiled)
    port = _image_index(compiled)
    scores = np.empty((len(masks), len(targets)), dtype=np.float32)

    def feed(start: int, count: int) -> dict:
        # A static batch dim needs the last request padded; a dynamic one takes it short.
        images = np.zeros((batch if static else count, *image.shape), dtype=np.uint8)
        mask_images(image, masks[start:start + count], out=images[:count])
        return {port: images}

    def collect(request: ov.InferRequest, start: int, count: int) -> None:
        scores[start:start + count] = _target_scores(request, output_index, count, wanted)

    requests = _infer_batches(compiled, len(masks), batch, feed, collect, deadline, cancel)
    return scores, requests


def _weigh_in_graph(scoring: MaskedScoring, image: np.ndarray, masks: np.ndarray,
                    targets: list[int], deadline: float | None,
                    cancel: threading.Event | None) -> tuple[np.ndarray, int]:
    """sum_i scores[i, t] * masks[i] as float32 [T, H * W], each batch's share from the graph.

    The shares are added in the order of the masks, whatever order the requests finish in, so
    that one seed gives one map bit for bit: float32 sums depend on their order. A share that
    finishes early waits in `early` (at most the queue's few requests).
    """
    batch, compiled = scoring.batch, scoring.compiled
    wanted = np.asarray(targets, dtype=np.int64)
    total = np.zeros((len(targets), masks.shape[1] * masks.shape[2]), dtype=np.float32)
    early: dict[int, np.ndarray] = {}  # first mask -> a share that finished before its turn
    next_start = 0

    def feed(start: int, count: int) -> dict:
        chunk = masks[start:start + count]
        if count < batch:  # zero masks add nothing to the sum
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]),
                                                    chunk.dtype)])
        return {GRAPH_IMAGE: image, GRAPH_MASKS: chunk, GRAPH_TARGETS: wanted}

    def collect(request: ov.InferRequest, start: int, count: int) -> None:
        nonlocal next_start
        share = request.get_output_tensor(0).data
        if start != next_start:
            early[start] = share.copy()  # the request's tensor is reused
            return
        np.add(total, share, out=total)
        next_start += batch
        while next_start in early:
            np.add(total, early.pop(next_start), out=total)
            next_start += batch

    requests = _infer_batches(compiled, len(masks), batch, feed, collect, deadline, cancel)
    return total, requests


def _check_image(compiled_model: ov.CompiledModel, image: np.ndarray) -> tuple[int, int]:
    """RISE does not resize: the image must already be at the model's input size."""
    _check_pixels(image)
    shape = _image_input(compiled_model).get_partial_shape()
    height, width = image.shape[:2]
    for axis, size in ((1, height), (2, width)):
        dim = shape[axis]
        if dim.is_static and dim.get_length() != size:
            raise ValueError(f"image is {height}x{width}, the model input is "
                             f"{shape[1]}x{shape[2]}")
    return height, width


def _check_graph_image(scoring: MaskedScoring, image: np.ndarray) -> tuple[int, int]:
    _check_pixels(image)
    if image.shape[:2] != (scoring.height, scoring.width):
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, the model input is "
                         f"{scoring.height}x{scoring.width}")
    return scoring.height, scoring.width


def _check_pixels(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be u8 [H, W, 3], got {image.dtype} {image.shape}")


def _class_count(compiled_model: ov.CompiledModel) -> int | None:
    classes = _logits_output(compiled_model).get_partial_shape()[-1]
    return classes.get_length() if classes.is_static else None


def _check_targets(targets: list[int], limit: int | None) -> list[int]:
    targets = [int(t) for t in targets]
    if not targets:
        raise ValueError("targets is empty")
    for t in targets:
        if t < 0 or (limit is not None and t >= limit):
            raise ValueError(f"target {t} is outside [0, {limit})")
    return targets


