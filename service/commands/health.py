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
    from ..config import ConfigError
    from ..health import HealthError, check_health
    from ..security import ServerAccess

    if not 0 < args.timeout <= 3600:  # NaN fails too
        return fail("health", f"--timeout {args.timeout}: give seconds in (0, 3600]")
    try:
        check_port(args.server)
        access = ServerAccess(args.tls_ca, args.tls_cert, args.tls_key)
        access.credentials()  # the files checked now, each error naming its flag
    except (ValueError, ConfigError) as exc:
        return fail("health", str(exc))
    if args.tls_cert and not args.tls_ca:
        return fail("health", "--tls-cert needs --tls-ca (the server's CA)")
    try:
        status = check_health(args.server, args.service, args.timeout, access,
                              args.tls_server_name)
    except HealthError as exc:
        print(f"xaiserve health: {exc}", file=sys.stderr)
        return 1
    print(f"{args.server} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1
