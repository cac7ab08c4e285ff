"""The response cache on a real server: an explanation or a prediction asked again is the
answer given before (its id the new request's, its timings the lookup's), counted as Triton
counts hits and misses in ModelStatistics and in the metrics; a model can opt out; the cache
itself keeps the most recently used answers within its bytes."""

from __future__ import annotations

import shutil

import grpc
import pytest

from xaiserve.service.config import ModelSettings, ServerSettings
from xaiserve.service.proto import grpc_predict_v2_pb2 as kpb
from xaiserve.service.proto import grpc_predict_v2_pb2_grpc as kgrpc
from xaiserve.service.proto import xaiserve_pb2 as xpb
from xaiserve.service.proto import xaiserve_pb2_grpc as xgrpc
from xaiserve.service.response_cache import ResponseCache, request_key
from xaiserve.service.server import Server

from tests.test_operations import explain_request, infer_request, sample, scrape


@pytest.fixture(scope="module")
def cached(small_export, tmp_path_factory):
    """The small model twice, `shapes` cached and `uncached` opted out, in a 1 MB cache."""
    repo = tmp_path_factory.mktemp("cache")
    shutil.copytree(small_export.path, repo / "shapes" / "1")
    shutil.copytree(small_export.path, repo / "uncached" / "1")
    settings = ServerSettings(repository=repo, host="127.0.0.1", port=0, metrics_port=0,
                              response_cache_bytes=1024 * 1024,
                              defaults=ModelSettings(black_box_masks=200),
                              models={"uncached": ModelSettings(response_cache=False,
                                                                black_box_masks=200)})
    server = Server(settings).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield (server, kgrpc.GRPCInferenceServiceStub(channel),
           xgrpc.ExplanationServiceStub(channel))
    channel.close()
    server.stop(grace=1)


def statistics(stub, model: str) -> kpb.InferStatistics:
    (stats,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=model, version="1"),
                                    timeout=30).model_stats
    return stats


def lookups(server) -> dict[str, float]:
    families = scrape(server.metrics_port)
    return {result: sample(families, "xaiserve_response_cache_lookups",
                           "xaiserve_response_cache_lookups_total", result=result)
            for result in ("hit", "miss")}


def inferences_observed(server) -> float:
    return sample(scrape(server.metrics_port), "xaiserve_inference_seconds",
                  "xaiserve_inference_seconds_count", model="shapes", version="1")


def test_an_explanation_asked_again_is_the_answer_given_before(cached):
    """A black-box explanation (200 forward passes) asked again by another caller: the same
    classes and maps, its own id, the lookup's timings; another seed is another answer."""
    server, kserve, explainer = cached
    before = lookups(server)
    first = explainer.Explain(explain_request(xpb.METHOD_BLACK_BOX, seed=7, request_id="a"),
                              timeout=120)
    again = explainer.Explain(explain_request(xpb.METHOD_BLACK_BOX, seed=7, request_id="b"),
                              timeout=120)
    assert first.id == "a" and again.id == "b"
    assert set(again.timings_ms) == {"cache", "total"} and "inference" in first.timings_ms
    assert list(again.predictions) == list(first.predictions)
    assert list(again.maps) == list(first.maps)
    nameless = explainer.Explain(explain_request(xpb.METHOD_BLACK_BOX, seed=7), timeout=120)
    assert len(nameless.id) == 32 and set(nameless.timings_ms) == {"cache", "total"}
    other = explainer.Explain(explain_request(xpb.METHOD_BLACK_BOX, seed=8), timeout=120)
    assert "inference" in other.timings_ms and list(other.maps) != list(first.maps)
    after = lookups(server)
    assert after["hit"] - before["hit"] == 2 and after["miss"] - before["miss"] == 2
    families = scrape(server.metrics_port)
    assert sample(families, "xaiserve_response_cache_entries",
                  "xaiserve_response_cache_entries") >= 2


def test_a_prediction_asked_again_is_counted_as_triton_counts_a_hit(cached):
    server, kserve, _ = cached
    stats_before = statistics(kserve, "shapes")
    inferences_before = inferences_observed(server)
    first = kserve.ModelInfer(infer_request(request_id="one"), timeout=30)
    again = kserve.ModelInfer(infer_request(request_id="two"), timeout=30)
    # xaiserve_inference_seconds observes inferences: the hit ran none
    assert inferences_observed(server) - inferences_before == 1
    assert again.id == "two" and again.parameters["cache_hit"].bool_param
    assert "cache_hit" not in first.parameters and "inference_ms" in first.parameters
    assert "inference_ms" not in again.parameters and again.parameters["cache_ms"].double_param > 0
    assert list(again.raw_output_contents) == list(first.raw_output_contents)
    stats = statistics(kserve, "shapes")
    hits = stats.inference_stats.cache_hit.count - stats_before.inference_stats.cache_hit.count
    misses = (stats.inference_stats.cache_miss.count
              - stats_before.inference_stats.cache_miss.count)
    assert hits >= 1 and misses <= 1  # the first may have been cached by an earlier test
    # a hit counts its images as inferred, without an execution (Triton's way)
    assert stats.inference_count - stats_before.inference_count == 2
    assert stats.execution_count - stats_before.execution_count == misses


def test_a_model_that_opts_out_is_computed_every_time(cached):
    server, kserve, explainer = cached
    before = lookups(server)
    for request_id in ("x", "y"):
        request = infer_request(request_id=request_id)
        request.model_name = "uncached"
        answer = kserve.ModelInfer(request, timeout=30)
        assert "cache_hit" not in answer.parameters and "inference_ms" in answer.parameters
    assert lookups(server) == before
    assert statistics(kserve, "uncached").inference_stats.cache_miss.count == 0


def test_the_cache_keeps_the_most_recently_used_answers_within_its_bytes():
    cache = ResponseCache(max_bytes=300)
    keys = [bytes([i]) * 32 for i in range(4)]
    for key in keys[:3]:
        cache.put(key, b"x" * 68)  # 100 bytes with its key
    assert cache.get(keys[0]) == b"x" * 68  # used: the second is now the oldest
    cache.put(keys[3], b"y" * 68)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert cache.get(keys[2]) is not None and cache.get(keys[3]) is not None
    cache.put(b"\xff" * 32, b"z" * 400)  # larger than the cache: not kept, nothing dropped
    assert cache.get(b"\xff" * 32) is None and cache.totals().entries == 3
    totals = cache.totals()
    assert (totals.bytes, totals.hits, totals.misses) == (300, 4, 2)


def test_a_key_is_the_request_without_its_id_on_one_compiled_version():
    request = infer_request(request_id="one")
    key = request_key("ModelInfer", "shapes", 1, "files+settings", request)
    request.id = "two"
    assert request_key("ModelInfer", "shapes", 1, "files+settings", request) == key
    assert request.id == "two"  # given back
    assert request_key("ModelInfer", "shapes", 2, "files+settings", request) != key
    assert request_key("ModelInfer", "shapes", 1, "other settings", request) != key
    assert request_key("Explain", "shapes", 1, "files+settings", request) != key
    request.raw_input_contents[0] = bytes(len(request.raw_input_contents[0]))
    assert request_key("ModelInfer", "shapes", 1, "files+settings", request) != key
