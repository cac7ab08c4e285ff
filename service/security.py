"""TLS / mutual TLS credentials and the bearer token, for the server and its clients.

The token never comes from the command line (it would show in `ps`): a file or an env var."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from .config import ConfigError, ServerSettings

TOKEN_ENV = "XAISERVE_TOKEN"


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS with cert + key; mutual TLS when a client CA is given."""
    if settings.tls_cert is None:
        return None
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    if b"PRIVATE KEY" not in key:
        raise ConfigError(f"--tls-key {settings.tls_key}: no PEM private key in it")
    if b"CERTIFICATE" not in cert:
        raise ConfigError(f"--tls-cert {settings.tls_cert}: no PEM certificate in it")
    ca = _read(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def read_token(token_file: Path | None, flag: str = "--token-file") -> str | None:
    """The token from `token_file`, else from $XAISERVE_TOKEN, else None (no check)."""
    if token_file is not None:
        token = _read(token_file, flag).decode("utf-8", "replace").strip()
        if not token:
            raise ConfigError(f"{flag} {token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def bearer_matches(metadata, token: str) -> bool:
    """True when the call carries `authorization: Bearer <token>` (constant-time compare)."""
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else value
            return hmac.compare_digest(given, expected)
    return False


def channel_credentials(ca: Path | None = None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (default: the system roots); present cert + key for mutual TLS."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca") if ca else None,
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None)
