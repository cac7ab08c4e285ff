"""TLS / mutual TLS credentials and the bearer token, for the server and its clients.

The token never comes from the command line (it would show in `ps`): a file or an env var.
Certificates and the token file are read again once they change (rotation without a restart)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from .config import ConfigError, ServerSettings
from .file_changes import RotatedFiles

TOKEN_ENV = "XAISERVE_TOKEN"

log = logging.getLogger("xaiserve.security")


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def tls_files(settings: ServerSettings) -> list[Path]:
    """The server's certificate, key and (if given) client CA: what a rotation replaces."""
    return [settings.tls_cert, settings.tls_key] + (
        [settings.tls_client_ca] if settings.tls_client_ca else [])


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """None for plaintext; TLS with cert + key; mutual TLS when a client CA is given. The files
    are read again at a handshake after they change (certificates are rotated, by
    cert-manager every few weeks): new connections get the new ones without a restart."""
    if settings.tls_cert is None:
        return None
    files = RotatedFiles(tls_files(settings))

    def configuration() -> grpc.ServerCertificateConfiguration:
        cert = _pem(settings.tls_cert, "--tls-cert", b"CERTIFICATE")
        key = _pem(settings.tls_key, "--tls-key", b"PRIVATE KEY")
        check_key_pair(cert, key, settings.tls_cert, settings.tls_key)
        ca = (_pem(settings.tls_client_ca, "--tls-client-ca", b"CERTIFICATE")
              if settings.tls_client_ca else None)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # at each handshake
        if not files.changed():
            return None
        try:
            renewed = configuration()
        except ConfigError as exc:  # half-written, or the key not there yet: the next
            # change is looked at again
            log.warning("TLS files changed but cannot be used (%s); keeping the ones before",
                        exc)
            return None
        log.info("TLS files changed; new connections use them")
        return renewed
    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=settings.tls_client_ca is not None)


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The REST side's TLS (service.rest) from the same files as gRPC's: None for plaintext;
    client certificates required when a client CA is given. A handshake after the files
    changed gets a context read from them again (rotation without a restart, as on gRPC)."""
    if settings.tls_cert is None:
        return None
    files = RotatedFiles(tls_files(settings))

    def build() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = on_hello
        return context

    def on_hello(connection: ssl.SSLObject, _server_name, _context) -> None:
        if files.changed():
            try:
                latest[0] = build()
                log.info("TLS files changed; new REST connections use them")
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS files changed but cannot be used on REST (%s); keeping the "
                            "ones before", exc)
        if connection.context is not latest[0]:
            connection.context = latest[0]

    latest = [build()]
    return latest[0]


class BearerToken:
    """The tokens calls may carry: from `--token-file` (read again once it changes, so a
    rotated Secret needs no restart; an empty or unreadable new file keeps the ones before),
    else from $XAISERVE_TOKEN, else none (no check). The file holds one token a line: during a
    rotation the old and the new one are both accepted, so edge devices can be moved over one
    by one, and the old line is removed when the last has moved."""

    def __init__(self, token_file: Path | None):
        self.token_file = token_file
        self._tokens = _with_ids(read_tokens(token_file))
        self._files = RotatedFiles([token_file]) if token_file is not None else None

    def current(self) -> dict[str, str]:
        """{token: its token_id} (hashed once, when the file is read, not per call)."""
        if self._files is not None and self._files.changed():
            try:
                before, self._tokens = self._tokens, _with_ids(read_tokens(self.token_file))
                log.info("%s changed; %d token(s) accepted (%d new, %d no longer)",
                         self.token_file, len(self._tokens),
                         len(set(self._tokens) - set(before)), len(set(before) - set(self._tokens)))
            except ConfigError as exc:
                log.warning("the token file changed but cannot be used (%s); keeping the "
                            "tokens before", exc)
        return self._tokens


def _with_ids(tokens: tuple[str, ...]) -> dict[str, str]:
    return {token: token_id(token) for token in tokens}


def read_tokens(token_file: Path | None, flag: str = "--token-file") -> tuple[str, ...]:
    """The tokens in `token_file` (one a line; blank lines and lines starting with # are
    skipped), else $XAISERVE_TOKEN, else none: no check."""
    if token_file is not None:
        lines = _read(token_file, flag).decode("utf-8", "replace").splitlines()
        tokens = tuple(dict.fromkeys(t for line in lines
                                     if (t := line.strip()) and not t.startswith("#")))
        if not tokens:
            raise ConfigError(f"{flag} {token_file}: no token in it (one a line)")
        bad = [i + 1 for i, line in enumerate(lines)
               if not line.strip().startswith("#") and any(c.isspace() for c in line.strip())]
        if bad:
            raise ConfigError(f"{flag} {token_file}: line {bad[0]} holds a space; one token a "
                              "line, nothing else")
        return tokens
    return tuple(filter(None, [os.environ.get(TOKEN_ENV)]))


def read_token(token_file: Path | None, flag: str = "--token-file") -> str | None:
    """A client's token: the first in `token_file`, else $XAISERVE_TOKEN, else None."""
    return next(iter(read_tokens(token_file, flag)), None)


def matching_token(metadata, tokens: Iterable[str]) -> str | None:
    """The one of `tokens` the call carries as `authorization: Bearer <token>`, or None (each
    compared in constant time, all of them: the time says nothing of which matched)."""
    for key, value in metadata or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else value
            matches = [t for t in tokens if hmac.compare_digest(given, f"Bearer {t}".encode())]
            return matches[0] if matches else None
    return None


def token_id(token: str) -> str:
    """A token's name in logs and metrics: the first 8 hex digits of its SHA-256 (`printf %s
    TOKEN | sha256sum | cut -c1-8`), which tells tokens apart without revealing them, so an
    operator sees when no device uses the old one any more."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def channel_credentials(ca: Path | None = None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (default: the system roots); present cert + key for mutual TLS."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    # checked here: gRPC takes any bytes and fails later with its own lines and UNAVAILABLE
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "--tls-ca", b"CERTIFICATE") if ca else None,
        private_key=_pem(key, "--tls-key", b"PRIVATE KEY") if key else None,
        certificate_chain=_pem(cert, "--tls-cert", b"CERTIFICATE") if cert else None)


@dataclass(frozen=True)
class ServerAccess:
    """How a client is let in: TLS (the server's CA; a certificate and its key for mutual
    TLS) and the bearer token. Read once from a command's options, and used by every
    connection it opens, gRPC and REST alike."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a log or a repr

    @classmethod
    def read(cls, tls_ca: Path | None = None, tls_cert: Path | None = None,
             tls_key: Path | None = None, token_file: Path | None = None) -> "ServerAccess":
        """The token from `token_file` or $XAISERVE_TOKEN; ConfigError naming the flag for a
        file that cannot be read or is not PEM (checked now, not at the first call)."""
        access = cls(tls_ca, tls_cert, tls_key, read_token(token_file))
        access.credentials()
        return access

    @property
    def tls(self) -> bool:
        return any((self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC's channel credentials; None for plaintext."""
        return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key) if self.tls else None

    def ssl_context(self) -> ssl.SSLContext:
        """The REST side's: trust tls_ca (default: the system roots), present cert + key."""
        self.credentials()  # the same checks of the files, naming the flags
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def headers(self) -> dict[str, str]:
        """The token as HTTP's Authorization header (gRPC's metadata carries the same)."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


def check_key_pair(cert: bytes, key: bytes, cert_path: Path, key_path: Path) -> None:
    """ConfigError unless `key` is an unencrypted private key of `cert`'s first certificate.
    gRPC takes any pair and then fails at start with "cannot bind" (its add_port fails); after
    a rotation that replaced one file and not yet the other it keeps the pair before, with C++
    error lines that name no file: the warning below names them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _memory_file(cert) as cert_file, _memory_file(key) as key_file:
        try:  # an empty password: an encrypted key fails here instead of prompting on a tty
            context.load_cert_chain(cert_file, key_file, password=b"")
        except ssl.SSLError as exc:
            why = ("the key is not the certificate's; give the key it was issued for"
                   if exc.reason == "KEY_VALUES_MISMATCH" else
                   "the key is encrypted; gRPC needs it unencrypted (openssl pkey -in KEY)"
                   if b"ENCRYPTED" in key else
                   "OpenSSL cannot read them as a certificate chain and its private key")
            raise ConfigError(f"--tls-cert {cert_path} and --tls-key {key_path}: {why}"
                              ) from None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` for OpenSSL, which reads only files: in memory where Linux allows
    (memfd), so key material is not written to disk, else a private temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("xaiserve-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pem"
        path.write_bytes(data)
        yield str(path)


def _pem(path: Path, flag: str, kind: bytes) -> bytes:
    """The file's bytes, which must hold a PEM block of `kind` (CERTIFICATE, PRIVATE KEY)."""
    data = _read(path, flag)
    if b"-----BEGIN " not in data or kind not in data:
        raise ConfigError(f"{flag} {path}: no PEM {kind.decode().lower()} in it")
    return data
