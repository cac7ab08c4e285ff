"""RISE on real OpenVINO models whose logits are a known function of the input.

The test model scores class 0 by the brightness of the top-left quadrant and class 1 by the
bottom-right one, so a correct RISE map must point at that quadrant. A third, constant
"background" logit dominates the softmax, which makes each class's score grow with its own
quadrant only (no tug of war between the two classes).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from xaiserve.export.int8_agreement import spearman
from xaiserve.service.rise import (
    MaskCache,
    RiseAborted,
    RiseExplainer,
    RiseSettings,
    accumulate_saliency,
    generate_masks,
)
from xaiserve.service.rise_graph import MaskedScoring, masked_scoring_graph

SIZE = 32
HALF = SIZE // 2
GAIN = 10.0  # logit per unit of mean quadrant brightness (0..1)
BACKGROUND = 8.0  # the constant third logit
FAST = RiseSettings(num_masks=500, cells=8, p_keep=0.5, seed=0, batch_size=16)


def quadrant_model(batch: int = -1, precision: str | None = None) -> ov.CompiledModel:
    """The quadrant graph compiled as the server compiles its copies, at the device's default
    precision or at `precision`."""
    return ov.Core().compile_model(quadrant_graph(batch), "CPU", compile_config(precision))


def compile_config(precision: str | None) -> dict:
    config = {"PERFORMANCE_HINT": "THROUGHPUT"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def quadrant_graph(batch: int = -1) -> ov.Model:
    """u8 [batch, 32, 32, 3] -> logits [batch, 3] = [GAIN * TL, GAIN * BR, BACKGROUND]."""
    image = ops.parameter([batch, SIZE, SIZE, 3], ov.Type.u8, name="image")
    scaled = ops.multiply(ops.convert(image, ov.Type.f32), ops.constant(np.float32(1 / 255)))
    flat = ops.reshape(scaled, ops.constant(np.array([-1, SIZE * SIZE * 3], np.int64)), False)
    weights = np.zeros((SIZE, SIZE, 3, 3), np.float32)
    weights[:HALF, :HALF, :, 0] = GAIN / (HALF * HALF * 3)
    weights[HALF:, HALF:, :, 1] = GAIN / (HALF * HALF * 3)
    logits = ops.add(ops.matmul(flat, ops.constant(weights.reshape(-1, 3)), False, False),
                     ops.constant(np.array([0.0, 0.0, BACKGROUND], np.float32)))
    logits.output(0).set_names({"logits"})
    return ov.Model([logits], [image], "quadrants")


def quadrant_scoring(batch: int, precision: str | None = None) -> MaskedScoring:
    """The quadrant model's masked-scoring copy (service.rise_graph), at the device's default
    precision or at `precision`."""
    graph = masked_scoring_graph(quadrant_graph(), batch, SIZE, SIZE)
    compiled = ov.Core().compile_model(graph, "CPU", compile_config(precision))
    return MaskedScoring(compiled, batch, SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def dynamic_model() -> ov.CompiledModel:
    return quadrant_model()


@pytest.fixture(scope="module", params=["numpy", "graph"])
def scorer(request, dynamic_model) -> ov.CompiledModel | MaskedScoring:
    """Either way RISE runs: masking in numpy on the plain model, or in the masked-scoring
    graph as the server runs it (at the device's default precision, bf16 on AMX CPUs)."""
    return dynamic_model if request.param == "numpy" else quadrant_scoring(16)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.clip(200 + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def quadrant(name: str) -> np.ndarray:
    inside = np.zeros((SIZE, SIZE), bool)
    rows = slice(0, HALF) if name[0] == "t" else slice(HALF, SIZE)
    cols = slice(0, HALF) if name[1] == "l" else slice(HALF, SIZE)
    inside[rows, cols] = True
    return inside


# ----------------------------------------------------------------------------- localisation

@pytest.mark.parametrize("target, where", [(0, "tl"), (1, "br")])
def test_map_points_at_the_quadrant_that_drives_the_class(scorer, image, target, where):
    maps = RiseExplainer(MaskCache()).explain(scorer, image, [0, 1], FAST)
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == np.float32
    saliency, inside = maps[target], quadrant(where)
    # RISE maps sit on a baseline (the mean score), so compare above the map's minimum.
    above = saliency - saliency.min()
    assert above[inside].mean() > 2 * above[~inside].mean()
    positive = np.clip(saliency - saliency.mean(), 0, None)
    assert positive[inside].sum() / positive.sum() > 0.8
    assert inside.flat[saliency.argmax()]


def test_target_order_is_kept(scorer, image):
    explainer = RiseExplainer(MaskCache())
    both = explainer.explain(scorer, image, [0, 1], FAST)
    swapped = explainer.explain(scorer, image, [1, 0], FAST)
    np.testing.assert_allclose(swapped, both[::-1], rtol=1e-6)


# ------------------------------------------------------------------------------ determinism

def test_same_seed_same_map_different_seed_different_map(scorer, image):
    # Separate caches: the second map is rebuilt from freshly generated masks.
    first = RiseExplainer(MaskCache()).explain(scorer, image, [0], FAST)
    again = RiseExplainer(MaskCache()).explain(scorer, image, [0], FAST)
    other = RiseExplainer(MaskCache()).explain(
        scorer, image, [0], RiseSettings(num_masks=500, seed=1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_the_graphs_map_does_not_depend_on_the_order_requests_finish_in(image):
    """The graph path adds each batch's share as its request finishes; float32 sums depend on
    their order, so the shares must be added in the masks' order for one seed to give one map
    bit for bit (a server test found maps differing in the 7th digit)."""
    scoring = quadrant_scoring(2)  # 500 requests, a few in flight at a time on two streams
    explainer = RiseExplainer(MaskCache())
    settings = RiseSettings(num_masks=1000)
    first = explainer.explain(scoring, image, [0, 1], settings)
    for _ in range(10):
        np.testing.assert_array_equal(explainer.explain(scoring, image, [0, 1], settings), first)


def test_masks_follow_rise(image):
    masks = generate_masks(SIZE, SIZE, FAST)
    assert masks.shape == (FAST.num_masks, SIZE, SIZE)
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(float(masks.mean(dtype=np.float64)) - FAST.p_keep) < 0.02
    # Smooth (bilinear), not binary, and not all alike.
    assert ((masks > 0.05) & (masks < 0.95)).mean() > 0.2
    assert not np.array_equal(masks[0], masks[1])
    # Non-square and non-divisible sizes crop correctly.
    assert generate_masks(30, 45, RiseSettings(num_masks=3, cells=7)).shape == (3, 30, 45)


# ------------------------------------------------------------------------------------ cache

def test_masks_are_cached_and_reused(dynamic_model, image):
    cache = MaskCache()
    explainer = RiseExplainer(cache)
    explainer.explain(dynamic_model, image, [0], FAST)
    assert (cache.misses, cache.hits, len(cache)) == (1, 0, 1)
    # batch_size is not part of the key: a different batch reuses the same masks.
    explainer.explain(dynamic_model, image, [1], RiseSettings(num_masks=500, batch_size=7))
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)
    masks = cache.get(SIZE, SIZE, FAST)
    assert masks is cache.get(SIZE, SIZE, FAST)
    assert not masks.flags.writeable


def test_cache_evicts_least_recently_used():
    cache = MaskCache(max_entries=2)
    a, b, c = (RiseSettings(num_masks=4, seed=s) for s in range(3))
    first_a = cache.get(8, 8, a)
    cache.get(8, 8, b)
    cache.get(8, 8, a)  # a is now the most recent
    cache.get(8, 8, c)  # evicts b
    assert len(cache) == 2
    assert cache.get(8, 8, a) is first_a
    misses = cache.misses
    cache.get(8, 8, b)
    assert cache.misses == misses + 1


def test_cache_keeps_within_its_byte_budget():
    settings = [RiseSettings(num_masks=10, seed=s) for s in range(3)]
    one = 10 * 16 * 16 * 2  # float16
    cache = MaskCache(max_entries=10, max_bytes=2 * one)
    for s in settings:
        cache.get(16, 16, s)
    assert len(cache) == 2 and cache.nbytes == 2 * one
    tiny = MaskCache(max_bytes=1)  # the newest entry stays even over the budget
    assert tiny.get(16, 16, settings[0]) is tiny.get(16, 16, settings[0])


def test_concurrent_callers_share_one_mask_stack():
    cache = MaskCache()
    settings = RiseSettings(num_masks=300)
    results: list[np.ndarray] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(cache.get(64, 64, settings))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert len(cache) == 1


# ----------------------------------------------------------------------------- accumulation

def test_accumulation_equals_direct_loop():
    rng = np.random.default_rng(3)
    settings = RiseSettings(num_masks=70, cells=4, p_keep=0.3)
    masks = generate_masks(12, 10, settings)
    scores = rng.random((70, 3)).astype(np.float32)
    expected = np.zeros((3, 12, 10), np.float64)
    for t in range(3):
        for i in range(70):
            expected[t] += float(scores[i, t]) * masks[i].astype(np.float64)
    expected /= 70 * 0.3
    for chunk in (16, 70, 1000):  # chunk boundaries must not matter
        got = accumulate_saliency(scores, masks, settings.p_keep, chunk=chunk)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="scores"):
        accumulate_saliency(np.ones((3, 1)), np.ones((4, 2, 2)), 0.5)


# ------------------------------------------------------------------------- forward passes

def test_forward_passes_equal_num_masks(dynamic_model, image):
    explainer = RiseExplainer(MaskCache())
    result = explainer.run(dynamic_model, image, [0, 1], FAST)
    assert result.forward_passes == FAST.num_masks
    assert result.batch_size == FAST.batch_size
    assert result.infer_requests == math.ceil(FAST.num_masks / FAST.batch_size)
    assert explainer.total_forward_passes == FAST.num_masks
    assert set(result.timings_ms) == {"masks", "inference", "accumulate"}


@pytest.mark.parametrize("static_batch", [1, 3])
def test_static_batch_gives_the_same_map(dynamic_model, image, static_batch):
    """Batch-1 IRs run one image per request; other static batches pad the last request."""
    settings = RiseSettings(num_masks=100, batch_size=16)
    cache = MaskCache()
    reference = RiseExplainer(cache).explain(dynamic_model, image, [0, 1], settings)
    result = RiseExplainer(cache).run(quadrant_model(static_batch), image, [0, 1], settings)
    assert result.batch_size == static_batch
    assert result.forward_passes == 100
    assert result.infer_requests == math.ceil(100 / static_batch)
    np.testing.assert_allclose(result.maps, reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch", [16, 7])
def test_masking_and_summing_in_the_graph_gives_the_numpy_map(image, batch):
    """Both computed in f32, the masked-scoring graph's maps equal the numpy path's, also where
    the last batch is padded with zero masks (500 masks: 4 and 3 left over)."""
    settings = RiseSettings(num_masks=500)
    cache = MaskCache()
    reference = RiseExplainer(cache).explain(quadrant_model(precision="f32"), image, [1, 0, 2],
                                             settings)
    result = RiseExplainer(cache).run(quadrant_scoring(batch, "f32"), image, [1, 0, 2],
                                      settings)
    assert (result.batch_size, result.forward_passes) == (batch, 500)
    assert result.infer_requests == math.ceil(500 / batch)
    assert result.maps.shape == (3, SIZE, SIZE) and result.maps.dtype == np.float32
    np.testing.assert_allclose(result.maps, reference, rtol=1e-5, atol=1e-7)


def test_the_graph_at_the_default_precision_ranks_pixels_as_numpy_does(dynamic_model, image):
    """At the device's default precision (bf16 on AMX CPUs) the masked images may differ by a
    grey level and the sum is rounded: the maps must still rank the pixels alike."""
    cache = MaskCache()
    reference = RiseExplainer(cache).explain(dynamic_model, image, [0, 1], FAST)
    maps = RiseExplainer(cache).explain(quadrant_scoring(16), image, [0, 1], FAST)
    for got, want in zip(maps, reference):
        assert spearman(got, want) > 0.999
        assert np.abs(got - want).max() < 0.02 * (want.max() - want.min())


def test_dropping_the_model_right_after_rise_neither_hangs_nor_aborts():
    """A server unloads models; OpenVINO must not be left with Python work on the model's threads.

    With a Python callback on the AsyncInferQueue, dropping the compiled model right after
    `wait_all` deadlocks or aborts within a few dozen tries; run it in a child so a hang fails.
    """
    script = textwrap.dedent("""
        import numpy as np
        from tests.test_rise import quadrant_model
        from xaiserve.service.rise import MaskCache, RiseExplainer, RiseSettings
        image = np.full((32, 32, 3), 200, np.uint8)
        explainer = RiseExplainer(MaskCache())
        for i in range(80):
            explainer.explain(quadrant_model(), image, [0, 1],
                              RiseSettings(num_masks=32, batch_size=4))
        print("done", explainer.total_forward_passes)
    """)
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["done", str(80 * 32)]


def test_deadline_and_cancel_abort(scorer, image):
    explainer = RiseExplainer(MaskCache())
    with pytest.raises(RiseAborted, match="deadline"):
        explainer.explain(scorer, image, [0], FAST, deadline=time.monotonic() - 1)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RiseAborted, match="cancelled"):
        explainer.explain(scorer, image, [0], FAST, cancel=cancel)
    assert explainer.total_forward_passes == 0


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("field, value", [
    ("num_masks", 0), ("num_masks", 2.5), ("num_masks", True), ("cells", 0), ("cells", 1000),
    ("p_keep", 0.0), ("p_keep", 1.0), ("p_keep", float("nan")), ("p_keep", "half"),
    ("seed", -1), ("batch_size", 0), ("batch_size", 10_000),
])
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RiseSettings(**{field: value})


def test_server_cap_names_num_masks(dynamic_model, image):
    with pytest.raises(ValueError, match="num_masks 50000 is over the server cap 10000"):
        RiseSettings(num_masks=50_000).validate(10_000)
    with pytest.raises(ValueError, match="num_masks 500 is over the server cap 100"):
        RiseExplainer(MaskCache(), max_masks=100).explain(dynamic_model, image, [0], FAST)


@pytest.mark.parametrize("bad, message", [
    ({"image": np.zeros((16, 16, 3), np.uint8)}, "model input"),
    ({"image": np.zeros((SIZE, SIZE, 3), np.float32)}, "u8"),
    ({"targets": [3]}, "target 3"),
    ({"targets": []}, "targets"),
    ({"settings": RiseSettings(num_masks=10, cells=33)}, "cells"),
])
def test_invalid_requests_are_rejected(scorer, image, bad, message):
    args = {"image": image, "targets": [0], "settings": FAST} | bad
    with pytest.raises(ValueError, match=message):
        RiseExplainer(MaskCache()).explain(scorer, **args)
