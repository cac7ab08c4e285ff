"""Prometheus metrics of one server, in their own registry, exposed over HTTP.

Names in the spirit of OpenVINO Model Server's (ovms_requests_success, ovms_request_time_us,
ovms_current_requests), but ours and in base units (seconds)."""

from __future__ import annotations

from typing import Callable, Iterable

import openvino
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               PlatformCollector, ProcessCollector, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .response_cache import CacheTotals

# (model, version, "ready" | "loading" | "failed") of every listed version
VersionStates = Callable[[], Iterable[tuple[str, int, str]]]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
PASSES_BUCKETS = (10, 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "xaiserve_requests", "RPCs answered, by model, version, method, status code and "
            "protocol (grpc, or http: the REST side)",
            ["model", "version", "method", "code", "protocol"], registry=r)
        self.request_seconds = Histogram(
            "xaiserve_request_seconds", "Time to answer an RPC (all methods, all outcomes)",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "xaiserve_inference_seconds",
            "Model inference time of a successful request (ModelInfer, or Explain's prediction)",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.explanation_seconds = Histogram(
            "xaiserve_explanation_seconds",
            "Saliency time of a successful Explain (white-box map read-out or black-box RISE)",
            ["model", "version", "explainer"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("xaiserve_requests_in_flight",
                               "RPCs being handled now (health checks not counted)", registry=r)
        self.open_streams = Gauge("xaiserve_open_streams", "Request streams open now "
                                  "(ModelStreamInfer, ExplainStream; at most max_open_streams)",
                                  registry=r)
        self.shared_memory_regions = Gauge(
            "xaiserve_shared_memory_regions", "Shared memory regions registered now "
            "(--shared-memory system; at most 256)", registry=r)
        self.shared_memory_bytes = Gauge(
            "xaiserve_shared_memory_bytes", "Bytes the registered shared memory regions span",
            registry=r)
        self.forward_passes = Histogram(
            "xaiserve_black_box_forward_passes", "Forward passes (masked images) per black-box "
            "explanation", ["model", "version"], buckets=PASSES_BUCKETS, registry=r)
        self.token_calls = Counter(
            "xaiserve_token_calls", "Calls by the token they carried (its token_id: the first 8 "
            "hex digits of its SHA-256), to see when an old token is no longer used",
            ["token_id"], registry=r)
        self.config_reloads = Counter(
            "xaiserve_config_reloads", "Config reloads (SIGHUP or a changed file), by result: "
            "applied, or failed and the config before kept", ["result"], registry=r)
        for result in ("applied", "failed"):  # at 0 from the start: increase() over a series
            self.config_reloads.labels(result)  # born at 1 is 0, and a first failure unseen
        # the process (resident memory, CPU seconds, open files, start time) and what runs
        # (a rollout's versions side by side on a dashboard; OpenVINO decides the speed)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("xaiserve_build", "xaiserve and OpenVINO versions of this server",
             registry=r).info({"version": __version__, "openvino": openvino.get_version()})
        self._http = None

    def watch_versions(self, states: VersionStates) -> None:
        """Export `xaiserve_model_versions` from `states`, read at each scrape: a version that
        failed to load while the one before serves in its place must be visible to alerts."""
        self.registry.register(_VersionCollector(states))

    def watch_shared_memory(self, totals: Callable[[], tuple[int, int]]) -> None:
        """The regions' count and bytes from `totals`, read at each scrape."""
        self.shared_memory_regions.set_function(lambda: totals()[0])
        self.shared_memory_bytes.set_function(lambda: totals()[1])

    def watch_response_cache(self, totals: Callable[[], CacheTotals]) -> None:
        """The response cache's entries, bytes, hits and misses from `totals`, read at each
        scrape."""
        self.registry.register(_CacheCollector(totals))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on its own thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _VersionCollector:
    def __init__(self, states: VersionStates):
        self.states = states

    def collect(self):
        family = GaugeMetricFamily(
            "xaiserve_model_versions", "Listed model versions by state (1): ready, loading, or "
            "failed (the reason is in ModelInfo and the log)", labels=["model", "version", "state"])
        for model, version, state in self.states():
            family.add_metric([model, str(version), state], 1)
        yield family


class _CacheCollector:
    def __init__(self, totals):
        self.totals = totals

    def collect(self):
        totals = self.totals()
        yield GaugeMetricFamily("xaiserve_response_cache_entries",
                                "Answers kept in the response cache", value=totals.entries)
        yield GaugeMetricFamily("xaiserve_response_cache_bytes",
                                "Bytes the response cache holds (at most response_cache_bytes)",
                                value=totals.bytes)
        lookups = CounterMetricFamily("xaiserve_response_cache_lookups",
                                      "Requests looked up in the response cache, by result",
                                      labels=["result"])
        lookups.add_metric(["hit"], totals.hits)
        lookups.add_metric(["miss"], totals.misses)
        yield lookups
