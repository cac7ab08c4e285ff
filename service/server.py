"""The gRPC server: KServe v2, the explanation service, health and reflection on one port;
Prometheus metrics on another."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ConfigError, ServerSettings, check_server, unmatched_model_names
from .explain_service import ExplanationServicer
from .file_changes import file_identity
from .interceptor import COMPRESSION, RequestInterceptor
from .kserve import KServeServicer
from .message_stream import MessageStreams
from .model_health import ModelHealth
from .proto import grpc_predict_v2_pb2 as kserve_pb
from .proto import grpc_predict_v2_pb2_grpc as kserve_grpc
from .proto import xaiserve_pb2 as xai_pb
from .proto import xaiserve_pb2_grpc as xai_grpc
from .repository import ModelRepository
from .response_cache import CachedAnswers, ResponseCache
from .rest import RestApp, RestServer
from .security import BearerToken, server_credentials, server_ssl_context
from .shared_memory import SharedMemoryRegions
from .telemetry import Telemetry

log = logging.getLogger("xaiserve.server")

# Threads beyond the request limit: health probes, reflection and refusals never queue.
SPARE_THREADS = 4


def settings_changes(before, after) -> list[str]:
    """'key old -> new' for each field of two settings dataclasses that differs."""
    return [f"{f.name} {old!r} -> {new!r}" for f in dataclasses.fields(before)
            if (old := getattr(before, f.name)) != (new := getattr(after, f.name))]


# the API's services by full name: their health says the process takes requests (liveness)
API_SERVICES = (kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                xai_pb.DESCRIPTOR.services_by_name["ExplanationService"].full_name)


class Server:
    def __init__(self, settings: ServerSettings):
        check_server(settings)
        self.repository = ModelRepository(settings)
        self.health = health.HealthServicer()
        self.model_health = ModelHealth(self.health, self.repository.states,
                                        self.repository.holding_back_readiness)
        self.repository.listeners.append(self.model_health.sync)
        self.telemetry = Telemetry()
        self.repository.on_settings_failed = self.telemetry.config_reloads.labels("failed").inc
        self.telemetry.watch_versions(lambda: [
            (s.name, s.version, "ready" if s.ready else "failed" if s.error else "loading")
            for s in self.repository.states()])
        credentials = server_credentials(settings)
        repository = self.repository
        interceptor = RequestInterceptor(self.telemetry, settings.max_concurrent_requests,
                                         BearerToken(settings.token_file).current,
                                         max_response_bytes=settings.max_message_bytes,
                                         served=repository.serves,
                                         compression=COMPRESSION[settings.response_compression],
                                         model_limit=lambda name: repository.settings.for_model(
                                             name).max_requests_in_flight)
        # gRPC binds with SO_REUSEPORT by default: a second server on a port in use started,
        # and the kernel split the clients between the two; off, a taken port is an error
        options = [("grpc.so_reuseport", 0),
                   ("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_ping_interval_without_data_ms",
                    int(settings.min_client_ping_interval * 1000))]
        if settings.keepalive_time:
            options += [("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
                        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
                        ("grpc.http2.max_pings_without_data", 0),
                        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout * 1000))]
        if settings.max_connection_age:
            options += [("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
                        ("grpc.max_connection_age_grace_ms",
                         int(max(settings.shutdown_grace, 1) * 1000))]
        threads = max(settings.workers, settings.max_concurrent_requests + SPARE_THREADS)
        # an open stream holds a thread of the pool: they get threads of their own on top
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads + settings.max_open_streams),
            interceptors=[interceptor], options=options)
        self.streams = MessageStreams(interceptor, settings.max_concurrent_requests,
                                      settings.max_open_streams)
        self.shared_memory = SharedMemoryRegions(settings.shared_memory == "system",
                                                 settings.max_message_bytes)
        self.telemetry.watch_shared_memory(self.shared_memory.totals)
        self.response_cache = ResponseCache(settings.response_cache_bytes)
        self.telemetry.watch_response_cache(self.response_cache.totals)
        answers = CachedAnswers(self.response_cache,
                                lambda name: repository.settings.for_model(name).response_cache)
        kserve = KServeServicer(self.repository, self.streams, self.shared_memory, answers)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, self.grpc)
        self.explanation = ExplanationServicer(self.repository, settings, self.streams,
                                               self.shared_memory, answers)
        xai_grpc.add_ExplanationServiceServicer_to_server(self.explanation, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        services = (*API_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.grpc)
        address = f"{settings.host}:{settings.port}"
        self.tls = credentials is not None
        try:
            self.port = (self.grpc.add_secure_port(address, credentials) if self.tls
                         else self.grpc.add_insecure_port(address))
        except RuntimeError:  # gRPC raises for an address it cannot parse or resolve
            self.port = 0
        if self.port == 0:
            raise OSError(f"--host {settings.host} --port {settings.port}: cannot bind "
                          f"{settings.host}:{settings.port} (a local address, and a free port)")
        self.metrics_port: int | None = None
        self.rest: RestServer | None = None
        if settings.rest_port is not None:
            app = RestApp((kserve, self.explanation), interceptor, settings.max_message_bytes,
                          threads)
            ssl_context = server_ssl_context(settings)
            try:
                self.rest = RestServer(app, settings.host, settings.rest_port, ssl_context)
            except OSError as exc:
                self.grpc.stop(0)
                raise OSError(f"--rest-port {settings.rest_port}: cannot bind "
                              f"{settings.host}:{settings.rest_port} ({exc.strerror})") from None

    def start(self) -> "Server":
        self.repository.check_devices()
        if self.settings.metrics_port is not None:
            try:
                self.metrics_port = self.telemetry.serve_http(self.settings.host,
                                                              self.settings.metrics_port)
            except OSError as exc:
                raise OSError(f"--metrics-port {self.settings.metrics_port}: cannot bind "
                              f"({exc.strerror})") from None
        self.repository.start(wait=True)
        self._warn_about_configured_names()
        self.grpc.start()
        if self.rest is not None:
            self.rest.start()
        self.model_health.start(API_SERVICES)
        log.info("serving %s on port %d (%s)", ", ".join(self.repository.names()) or "nothing",
                 self.port, "TLS" if self.tls else "plaintext")
        unserved = self.repository.unserved()
        if unserved and self.settings.strict_readiness:
            log.warning("not ready: no version of %s serves (the lines above say why); health "
                        "'' is NOT_SERVING until one does", ", ".join(unserved))
        elif unserved:
            log.warning("no version of %s serves (the lines above say why); the server is "
                        "ready all the same (strict_readiness false): its health %s is "
                        "NOT_SERVING", ", ".join(unserved),
                        ", ".join(repr(name) for name in unserved))
        if self.shared_memory.enabled:
            log.warning("system shared memory on: callers may register shared memory objects "
                        "of this host (/dev/shm), which the server reads and writes with its "
                        "rights; for clients on this host that are trusted")
        if self.rest is not None:
            log.info("REST (Open Inference Protocol over HTTP%s) on port %d",
                     "S" if self.tls else "", self.rest.port)
        if self.metrics_port:
            log.info("metrics at http://%s:%d/metrics", self.settings.host, self.metrics_port)
        return self

    @property
    def settings(self) -> ServerSettings:
        """The repository's: one copy, replaced when the config is reloaded."""
        return self.repository.settings

    def _warn_about_configured_names(self) -> None:
        for warning in unmatched_model_names(self.settings, self.repository.names_on_disk()):
            log.warning(warning)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests (health NOT_SERVING, new RPCs refused), let in-flight ones
        finish within `grace` seconds (default: the settings' shutdown_grace)."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.repository.stop()
        rest = threading.Thread(target=self.rest.stop, args=(grace,)) if self.rest else None
        if rest is not None:  # both sides drain at once
            rest.start()
        self.grpc.stop(grace).wait()
        self.streams.stop()
        self.shared_memory.close()
        if rest is not None:
            rest.join()
        self.telemetry.stop_http()

    def reload_settings(self, settings: ServerSettings) -> list[str]:
        """Apply a reloaded config's `defaults` and `models` (the models whose settings changed
        are compiled again and swapped in, answering meanwhile); the server's own settings
        (port, TLS, limits...) take effect only at a restart, and a change to them is logged.
        The models recompiled; ValueError (a device not present) leaves everything as it was."""
        self.repository.check_devices(settings)
        at_restart = [f.name for f in dataclasses.fields(ServerSettings)
                      if f.name not in ("defaults", "models")
                      and getattr(settings, f.name) != getattr(self.settings, f.name)]
        if at_restart:
            log.warning("reloaded config: %s take effect only at a restart; kept as they were",
                        ", ".join(at_restart))
        before = self.settings
        applied = dataclasses.replace(before, defaults=settings.defaults, models=settings.models)
        for name in self.repository.names():
            changes = settings_changes(before.for_model(name), applied.for_model(name))
            if changes:
                log.info("config reloaded: %s: %s", name, "; ".join(changes))
        self.explanation.raise_black_box_cap(applied)
        changed = self.repository.apply_settings(applied)
        log.info("config reloaded; %s", f"recompiling {', '.join(changed)}" if changed
                 else "no loaded model's settings changed")
        self._warn_about_configured_names()
        return changed

    def serve_forever(self, grace: float | None = None,
                      reload: Callable[[], ServerSettings] | None = None,
                      watch: Path | None = None,
                      announce: Callable[[], None] = lambda: None) -> None:
        """Block until SIGTERM or SIGINT, then stop gracefully. With `reload` (the config read
        again), SIGHUP applies it (`reload_settings`), and so does a change to the file
        `watch` (as OVMS watches its config; a Kubernetes ConfigMap update lands this way); a
        config that does not load is logged and the server goes on with the one it has.
        `announce` runs once the handlers are in place: a SIGHUP sent on reading "serving"
        must find one (before, it was lost, or ended the process)."""
        wake = threading.Event()
        received: list[int] = []

        def on_signal(number, _frame) -> None:
            received.append(number)
            wake.set()
        for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if reload else ()):
            signal.signal(sig, on_signal)
        if reload and watch:
            threading.Thread(target=self._watch_file, args=(watch, on_signal), daemon=True,
                             name="config-watch").start()
        announce()
        while not {signal.SIGTERM, signal.SIGINT} & set(received):
            # Python runs a handler in the main thread once it is back in bytecode; a signal
            # the kernel gave to another thread (gRPC's, OpenVINO's) does not end a wait
            # without a timeout, so a SIGHUP could wait for the next one
            wake.wait(timeout=0.2)
            wake.clear()
            while signal.SIGHUP in received:
                received.remove(signal.SIGHUP)
                try:
                    self.reload_settings(reload())
                    self.telemetry.config_reloads.labels("applied").inc()
                except Exception as exc:  # noqa: BLE001 - a reload must not end the server
                    self.telemetry.config_reloads.labels("failed").inc()
                    log.error("config not reloaded, serving on with the one before: %s",
                              exc if isinstance(exc, (ConfigError, ValueError))
                              else f"{type(exc).__name__}: {exc}")
        self._watching = False
        grace = self.settings.shutdown_grace if grace is None else grace
        log.info("shutting down: no new requests, %.1f s for the ones in flight", grace)
        self.stop(grace)
        log.info("stopped")

    def _watch_file(self, path: Path, on_signal: Callable[[int, object], None]) -> None:
        """Every poll, the file's identity: a change that has held for one poll is handled as
        a SIGHUP (an editor's truncate-then-write must not apply the empty file between)."""
        self._watching = True
        applied = seen = file_identity(path)
        while self._watching:
            time.sleep(self.settings.poll_seconds)
            now = file_identity(path)
            if now is not None and now == seen and now != applied:
                log.info("%s changed; reading it again", path)
                applied = now
                on_signal(signal.SIGHUP, None)
            seen = now
