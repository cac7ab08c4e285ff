"""`xaiserve health`: a server's gRPC health status as an exit code, for probes and scripts."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import fail


def add_parser(sub) -> None:
    p = sub.add_parser("health", help="ask a server's gRPC health service; exit 0 if SERVING")
    p.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT (default: %(default)s)")
    p.add_argument("--service", default="", help="service name; default: the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of a TLS server")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM client key (mTLS)")
    p.add_argument("--tls-server-name", default=None, help="name in the server's certificate")
    p.set_defaults(run=run_health)


def run_health(args) -> int:
    """Exit 0 when SERVING, 1 when not (or unreachable), 2 on bad options."""
    from ..client import check_port
    from ..health import HealthError, TlsFiles, check_health

    if (args.tls_cert is None) != (args.tls_key is None):
        return fail("health", "--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        return fail("health", "--tls-cert needs --tls-ca (the server's CA)")
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            return fail("health", f"--{name.replace('_', '-')} {path}: no such file")
    if not 0 < args.timeout <= 3600:  # NaN fails too
        return fail("health", f"--timeout {args.timeout}: give seconds in (0, 3600]")
    try:
        check_port(args.server)
    except ValueError as exc:
        return fail("health", str(exc))
    tls = (TlsFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
           if args.tls_ca else None)
    try:
        status = check_health(args.server, args.service, args.timeout, tls)
    except HealthError as exc:
        print(f"xaiserve health: {exc}", file=sys.stderr)
        return 1
    print(f"{args.server} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1
