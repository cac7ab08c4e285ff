"""gRPC health (grpc.health.v1) that follows the repository.

- "" (the server; readiness): SERVING once started while every model in the repository serves
  a version (or is loading its first), NOT_SERVING while one serves none (every version failed,
  a pin that matches none, an unreadable folder) and from the start of a shutdown: a pod that
  cannot answer for a model it holds leaves its Service, and a rollout of a broken export stalls
  instead of replacing the pods that serve. With the settings' strict_readiness off (pods of
  many models): SERVING while the server takes requests, the broken model's own status alone
  NOT_SERVING.
- the API services by their full names (`inference.GRPCInferenceService`,
  `xaiserve.v1.ExplanationService`; liveness): SERVING while the process takes requests,
  whatever the models do: restarting a process does not mend a broken export.
- a model's name: SERVING while a version of it is ready, NOT_SERVING while every listed
  version is loading or failed, SERVICE_UNKNOWN once the model has left the repository (and
  NOT_FOUND for a name never served, grpc's answer for unknown services); for a monitor or a
  probe (`grpc: {port: 9000, service: NAME}`) that cares about one model.
Watchers get each change as it happens.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from grpc_health.v1 import health, health_pb2

from .repository import VersionState


def model_statuses(states: Iterable[VersionState]) -> dict[str, int]:
    """{model name: SERVING if any version of it is ready, else NOT_SERVING}."""
    ready: dict[str, bool] = {}
    for state in states:
        ready[state.name] = ready.get(state.name, False) or state.ready
    return {name: health_pb2.HealthCheckResponse.SERVING if up
            else health_pb2.HealthCheckResponse.NOT_SERVING for name, up in ready.items()}


class ModelHealth:
    """Keeps a HealthServicer's statuses in step with the repository; `sync` runs after every
    change of the table (a load ended, a scan added or dropped versions)."""

    def __init__(self, servicer: health.HealthServicer,
                 states: Callable[[], list[VersionState]],
                 unserved: Callable[[], list[str]]):
        self.servicer = servicer
        self.states = states
        self.unserved = unserved
        self._reported: dict[str, int] = {}
        self._started = False
        self._lock = threading.Lock()  # loader threads and the watcher sync at once

    def start(self, services: Iterable[str]) -> None:
        """The server takes requests: the API services SERVING, "" as the models say."""
        for service in services:
            self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._started = True
        self.sync()

    def sync(self) -> None:
        with self._lock:
            now = model_statuses(self.states())
            if self._started:
                now[""] = health_pb2.HealthCheckResponse.NOT_SERVING if self.unserved() \
                    else health_pb2.HealthCheckResponse.SERVING
            for name in self._reported.keys() - now.keys():
                self.servicer.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            for name, status in now.items():
                if self._reported.get(name) != status:
                    self.servicer.set(name, status)
            self._reported = now
