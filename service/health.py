"""One gRPC health check (grpc.health.v1), for container health checks and edge monitors.

Kubernetes probes the same service natively (`grpc:` probes); Docker and systemd have no gRPC
client, so they run `xaiserve health`, which answers with an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthError(RuntimeError):
    """The server could not be asked (unreachable, TLS mismatch, unknown service)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server: its CA and, where it asks for one, our client certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # when the certificate names another host than we dial

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_read(self.ca), _read(self.key), _read(self.cert))


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check_health(address: str, service: str = "", timeout: float = 3.0,
                 tls: TlsFiles | None = None) -> str:
    """The status name the server reports for `service` ("" is the whole server)."""
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = ([("grpc.ssl_target_name_override", tls.server_name)]
                   if tls.server_name else [])
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.NOT_FOUND and not details:  # grpc-health says nothing
            details = (f"the server has no health status for --service {service!r}; give a "
                       "served model's name, a service's full name, or none for the server")
        raise HealthError(f"{address}: {exc.code().name}: {details}") from None
    finally:
        channel.close()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
