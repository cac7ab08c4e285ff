"""Per-model gRPC health (grpc.health.v1): the service name is a model's name.

The server's own status (service "") says the process takes requests; a monitor, a load
balancer or a Kubernetes probe (`grpc: {port: 9000, service: NAME}`) that cares about one model
asks for it by name: SERVING while a version of it is ready, NOT_SERVING while every listed
version is loading or failed, SERVICE_UNKNOWN once the model has left the repository (and
NOT_FOUND for a name never served, grpc's answer for unknown services). Watchers get each
change as it happens.
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
    """Keeps a HealthServicer's per-model statuses in step with the repository; `sync` runs
    after every change of the table (a load ended, a scan added or dropped versions)."""

    def __init__(self, servicer: health.HealthServicer,
                 states: Callable[[], list[VersionState]]):
        self.servicer = servicer
        self.states = states
        self._reported: dict[str, int] = {}
        self._lock = threading.Lock()  # loader threads and the watcher sync at once

    def sync(self) -> None:
        with self._lock:
            now = model_statuses(self.states())
            for name in self._reported.keys() - now.keys():
                self.servicer.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            for name, status in now.items():
                if self._reported.get(name) != status:
                    self.servicer.set(name, status)
            self._reported = now
