"""One gRPC health check (grpc.health.v1), for container health checks and edge monitors.

Kubernetes probes the same service natively (`grpc:` probes); Docker and systemd have no gRPC
client, so they run `xaiserve health`, which answers with an exit code.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .security import ServerAccess


class HealthError(RuntimeError):
    """The server could not be asked (unreachable, TLS mismatch, unknown service)."""


def check_health(address: str, service: str = "", timeout: float = 3.0,
                 access: ServerAccess | None = None, server_name: str | None = None) -> str:
    """The status name the server reports for `service` ("" is the whole server). `access`
    gives the TLS files (health calls carry no token: the server answers them without one);
    `server_name` is the name in the server's certificate where it differs from `address`."""
    credentials = access.credentials() if access else None
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
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
