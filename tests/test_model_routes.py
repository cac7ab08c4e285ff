"""The server's extra compiled copies (scores-only, latency-when-idle, single-image) answer
exactly what the full model answers: a route is a speed choice, never a different result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from xaiserve.export.int8_agreement import spearman
from xaiserve.service.model import (
    RISE_BATCH,
    SALIENCY_OUTPUT,
    ClassifierModel,
    Routes,
    compiled_precision,
    without_saliency,
)
from xaiserve.service.rise import MaskCache, RiseExplainer, RiseSettings

THROUGHPUT = {"PERFORMANCE_HINT": "THROUGHPUT"}


@pytest.fixture(scope="module")
def models(default_export):
    path = default_export.path
    plain = ClassifierModel(path, config=THROUGHPUT).load()
    routed = ClassifierModel(path, config=THROUGHPUT, routes=Routes(
        scores_only=True, latency_when_idle=True, single_image_copies=True)).load()
    return plain, routed


@pytest.fixture(scope="module")
def batch(models, photos):
    plain, _ = models
    return np.stack([plain.preprocess(p) for p in photos.values()])


def test_scores_only_copy_has_no_saliency_branch(default_export):
    import openvino as ov

    model = ov.Core().read_model(str(default_export.path / "model.xml"))
    pruned = without_saliency(model)
    assert [("logits" in o.get_names()) for o in pruned.outputs] == [True]
    assert len(pruned.get_ops()) < len(model.get_ops())
    assert pruned.get_rt_info(["model_info", "model_type"]).astype(str) == "Classification"


def assert_answers_row(out, reference, i, names=("logits", SALIENCY_OUTPUT)):
    """`out`, the answer for image i alone, equals row i of the full model's answer."""
    for name in names:
        np.testing.assert_allclose(out[name], reference[name][i:i + 1], atol=1e-4)


def test_each_route_gives_the_full_models_answer(models, batch):
    plain, routed = models
    reference = plain.predict(batch)
    # Idle, one image: the LATENCY copy.
    for i in range(len(batch)):
        assert_answers_row(routed.predict(batch[i:i + 1]), reference, i)
    # Scores only: the pruned copy.
    scores = routed.predict(batch, ("logits",))
    assert set(scores) == {"logits"}
    np.testing.assert_allclose(scores["logits"], reference["logits"], atol=1e-4)


def test_single_images_run_on_copies_with_the_batch_fixed_at_1(default_export, models, batch):
    """Without the idle LATENCY copy, one image goes to the batch-1 copies (full or scores
    only), several to the dynamic ones."""
    plain, _ = models
    single = ClassifierModel(default_export.path, config=THROUGHPUT, routes=Routes(
        scores_only=True, single_image_copies=True)).load()
    assert plain.compiled.inputs[0].get_partial_shape()[0].is_dynamic
    for pool in (single._full_single, single._scores_single):
        assert pool.compiled.inputs[0].get_partial_shape()[0].get_length() == 1
    assert single._route(batch[:1], ("logits",), idle=False) is single._scores_single
    assert single._route(batch[:1], ("logits", SALIENCY_OUTPUT), False) is single._full_single
    assert single._route(batch, ("logits",), idle=False) is single._scores
    reference = plain.predict(batch)
    for i in range(len(batch)):
        assert_answers_row(single.predict(batch[i:i + 1]), reference, i)
        assert_answers_row(single.predict(batch[i:i + 1], ("logits",)), reference, i, ("logits",))
    several = single.predict(batch)
    np.testing.assert_allclose(several[SALIENCY_OUTPUT], reference[SALIENCY_OUTPUT], atol=1e-4)


def test_rise_copy_is_built_once_and_maps_as_the_scores_copy_does(models, batch):
    """RISE's masked-scoring copy (masking and summing in the graph) is compiled on first use,
    once, also under concurrent first calls; its maps rank the pixels as RISE on the scores
    copy with numpy masking does (both at the device's default precision)."""
    plain, routed = models
    assert routed._masked_scoring is None  # not compiled at load
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: routed.masked_scoring(), range(4)))
    scoring = copies[0]
    assert all(c is scoring for c in copies) and routed.masked_scoring() is scoring
    assert (scoring.batch, scoring.height, scoring.width, scoring.classes) == (
        RISE_BATCH, 224, 224, 1000)
    image = batch[0]
    target = int(np.argmax(plain.predict(batch[:1], ("logits",))["logits"][0]))
    settings = RiseSettings(num_masks=300)
    cache = MaskCache()
    in_graph = RiseExplainer(cache).run(scoring, image, [target], settings)
    in_numpy = RiseExplainer(cache).explain(routed._scores_single.compiled, image, [target],
                                            settings)
    assert in_graph.infer_requests == -(-300 // RISE_BATCH)
    assert spearman(in_graph.maps[0], in_numpy[0]) > 0.999


def test_rise_copy_takes_the_configured_batch_and_the_throughput_hint(default_export, batch):
    """RISE's thousand inferences per request are a throughput job: its copy of a model
    compiled for LATENCY gets the THROUGHPUT hint (the model's other settings kept)."""
    latency = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    model = ClassifierModel(default_export.path, config=latency,
                            routes=Routes(black_box_batch=3)).load()
    scoring = model.masked_scoring()
    assert scoring.batch == 3
    assert str(model.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert str(scoring.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert compiled_precision(scoring.compiled) == "f32"
    result = RiseExplainer(MaskCache()).run(scoring, batch[0], [0], RiseSettings(num_masks=20))
    assert (result.batch_size, result.infer_requests) == (3, 7)


def test_concurrent_callers_get_their_own_images_answers(models, batch):
    """Under load requests spread over all copies; each caller must still get its image's
    scores and map."""
    plain, routed = models
    reference = plain.predict(batch)
    jobs = [(i % len(batch), ("logits",) if i % 3 == 0 else None) for i in range(48)]

    def call(job):
        i, outputs = job
        return i, routed.predict(batch[i:i + 1], outputs)

    with ThreadPoolExecutor(8) as pool:
        for i, out in pool.map(call, jobs):
            np.testing.assert_allclose(out["logits"], reference["logits"][i:i + 1], atol=1e-4)
            if SALIENCY_OUTPUT in out:
                np.testing.assert_allclose(out[SALIENCY_OUTPUT],
                                           reference[SALIENCY_OUTPUT][i:i + 1], atol=1e-4)


def test_requests_waiting_for_a_busy_model_are_batched_and_answered_correctly(default_export,
                                                                              batch):
    from xaiserve.service.batching import BatchingPool

    plain = ClassifierModel(default_export.path, config=THROUGHPUT).load()
    batching = ClassifierModel(default_export.path, config=THROUGHPUT,
                               routes=Routes(scores_only=True, batch_when_busy=8)).load()
    reference = plain.predict(batch)
    pools = [batching._full, batching._scores]
    assert all(isinstance(pool, BatchingPool) for pool in pools)

    def call(i):
        outputs = ("logits",) if i % 2 else None
        return i % len(batch), batching.predict(batch[i % len(batch):][:1], outputs)

    with ThreadPoolExecutor(12) as pool:
        for i, out in pool.map(call, range(96)):
            np.testing.assert_allclose(out["logits"], reference["logits"][i:i + 1], atol=1e-4)
            if SALIENCY_OUTPUT in out:
                np.testing.assert_allclose(out[SALIENCY_OUTPUT],
                                           reference[SALIENCY_OUTPUT][i:i + 1], atol=1e-4)
    assert sum(p.images for p in pools) > sum(p.inferences for p in pools)  # batches formed

    # An unloaded version still answers a late request, inline.
    batching.close()
    late = batching.predict(batch[:1], ("logits",))
    np.testing.assert_allclose(late["logits"], reference["logits"][:1], atol=1e-4)
