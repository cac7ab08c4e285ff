"""`xaiserve models`: what a running server's repository holds, and "load it now" for a
pipeline that has just exported a version and must know that it serves before it moves on."""

from __future__ import annotations

import json
import sys

from .common import add_client_options, bounded_int, fail, server_access


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list a server's models and versions with their state, "
                                      "or load one now (exit 0 once it serves)")
    p.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT (default: %(default)s)")
    p.add_argument("--load", metavar="NAME", default=None,
                   help="scan the server's repository now and wait until NAME's newest version "
                        "serves: exit 0, or 1 with the reason it does not")
    p.add_argument("--ready", action="store_true", help="list only the versions that serve")
    p.add_argument("--json", action="store_true", help="the list as JSON, for machines")
    p.add_argument("--timeout", type=bounded_int(1, 3600), default=600,
                   help="seconds to wait for the server (a compile, with --load; default 600)")
    add_client_options(p)
    p.set_defaults(run=run_models)


def run_models(args) -> int:
    """0: listed, or loaded and serving; 1: the server said no or could not be reached;
    2: bad options."""
    import grpc

    from ..client import XaiClient, check_port
    from ..config import ConfigError

    try:
        check_port(args.server)
        client = XaiClient.connect(args.server, access=server_access(args),
                                   retries=args.retries, timeout=args.timeout)
    except (ValueError, ConfigError) as exc:
        return fail("models", str(exc))
    try:
        if args.load is not None:
            client.load_model(args.load)
            newest = max((m for m in client.repository_index(ready_only=True)
                          if m.name == args.load), key=lambda m: int(m.version))
            print(f"{args.load} version {newest.version} serves")
            return 0
        listed = client.repository_index(ready_only=args.ready)
    except grpc.RpcError as exc:
        print(f"xaiserve models: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    rows = [{"name": m.name, "version": int(m.version), "state": m.state, "reason": m.reason}
            for m in listed]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """Columns as wide as their longest cell; the reason last, whole."""
    header = {"name": "NAME", "version": "VERSION", "state": "STATE", "reason": "REASON"}
    cells = [header] + [{k: str(v) for k, v in row.items()} for row in rows]
    widths = {k: max(len(c[k]) for c in cells) for k in ("name", "version", "state")}
    return "\n".join(f"{c['name']:<{widths['name']}}  {c['version']:>{widths['version']}}  "
                     f"{c['state']:<{widths['state']}}  {c['reason']}".rstrip() for c in cells)
