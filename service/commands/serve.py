"""`xaiserve serve`: options and the YAML config to ServerSettings, then serve until SIGTERM
(SIGHUP: the config read again)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .common import fail, true_or_false


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC (KServe v2 + explain)")
    p.add_argument("--repository", type=Path, default=None, help="default: models")
    p.add_argument("--port", type=int, default=None, help="default: 9000")
    p.add_argument("--host", default=None, help="default: 0.0.0.0")
    p.add_argument("--config", type=Path, default=None, help="YAML: defaults, models, server "
                   "(read again on SIGHUP and when the file changes)")
    p.add_argument("--no-watch-config", dest="watch_config", action="store_false",
                   help="read --config again on SIGHUP only, not when the file changes")
    p.add_argument("--check-config", action="store_true",
                   help="check the settings (config, flags, TLS and token files, devices) and "
                        "list the repository's models, then exit: 0 when they would serve, 2 "
                        "with one line naming what to fix; nothing is compiled")
    p.add_argument("--device", default=None, help="CPU, GPU, NPU, AUTO, HETERO:...")
    p.add_argument("--performance-hint", default=None,
                   choices=["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"])
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--inference-precision", default=None,
                   choices=["default", "f32", "bf16", "f16"],
                   help="arithmetic of the layers that are not INT8 (default: the device's "
                        "choice, bf16 on CPUs with AMX; f32 keeps f32's classes, slower)")
    p.add_argument("--max-black-box-masks", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--log-level", default="INFO")
    add_serve_operations(p)
    p.set_defaults(run=run_serve)


def add_serve_operations(p) -> None:
    """Operations and security options of `serve` (metrics, logs, shutdown, TLS, token, limits)."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--rest-port", type=int, default=None,
                   help="also serve the Open Inference Protocol over HTTP/JSON (KServe v2 REST,"
                        " Triton's binary tensors) on this port, with the same token, TLS and "
                        "limits (default: off)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one object per line with request_id, model, version, code, ms")
    p.add_argument("--shutdown-grace", type=float, default=None,
                   help="seconds in-flight requests get after SIGTERM (default: 10)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="require 'authorization: Bearer <token>' with a token in this file "
                        "(one a line: old and new during a rotation; or $XAISERVE_TOKEN); "
                        "health checks are exempt")
    p.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="beyond it requests get RESOURCE_EXHAUSTED (default: 32)")
    p.add_argument("--max-open-streams", type=int, default=None,
                   help="request streams (ModelStreamInfer, ExplainStream) open at once; "
                        "beyond it a stream is refused with RESOURCE_EXHAUSTED (default: 16)")
    p.add_argument("--strict-readiness", type=true_or_false, default=None,
                   metavar="true|false",
                   help="true (default): ready only while every model serves a version; "
                        "false: ready while the server takes requests (many models per pod)")
    p.add_argument("--shared-memory", default=None, choices=["off", "system"],
                   help="system: clients on this host may pass tensors through POSIX shared "
                        "memory regions (Triton's extension: tritonclient.utils.shared_memory,"
                        " perf_analyzer --shared-memory system); they read and write them with"
                        " the server's rights (default: off)")
    p.add_argument("--response-cache-bytes", type=int, default=None,
                   help="keep answers of ModelInfer and Explain for the same request (a RISE "
                        "explanation asked again is answered at once) within this many bytes, "
                        "least recently used out; per model: response_cache (default: 0, off)")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="largest request or response (default: 32 MiB)")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help="how often the repository is compared with the disk (default: 2)")
    p.add_argument("--max-connection-age", type=float, default=None,
                   help="seconds after which a client connection is closed so that clients "
                        "reconnect and spread over new replicas (default: 0, never)")
    p.add_argument("--keepalive-time", type=float, default=None,
                   help="seconds of idleness after which the server pings a connection and "
                        "closes it if unanswered (vanished devices; default: 60, 0: never)")
    p.add_argument("--response-compression", default=None, choices=["none", "gzip", "deflate"],
                   help="compress responses over 16 KiB (saliency maps: about half with gzip) "
                        "for clients that accept it (default: none)")
    p.add_argument("--min-client-ping-interval", type=float, default=None,
                   help="clients' keepalive pings accepted this often, with or without calls "
                        "(default: 10 s; more often gets GOAWAY too_many_pings)")


SERVE_OPERATION_KEYS = ("metrics_port", "rest_port", "shutdown_grace", "tls_cert", "tls_key",
                        "tls_client_ca", "token_file", "max_concurrent_requests",
                        "max_open_streams", "strict_readiness", "shared_memory",
                        "max_message_bytes",
                        "poll_seconds", "max_connection_age", "keepalive_time",
                        "min_client_ping_interval", "response_compression",
                        "response_cache_bytes")


def run_serve(args) -> int:
    import logging

    from ..config import ConfigError, load_settings
    from ..server import Server

    from .. import logs

    try:
        logs.configure(args.log_level, args.log_format)
    except ValueError as exc:
        return fail("serve", f"--log-level {args.log_level}: {exc}")

    def settings_now():
        """The config file as it is now, under the flags (which always win): read at start
        and again on SIGHUP."""
        return load_settings(args.config, repository=args.repository, port=args.port,
                             host=args.host, workers=args.workers, device=args.device,
                             performance_hint=args.performance_hint,
                             num_requests=args.num_requests,
                             inference_precision=args.inference_precision,
                             max_black_box_masks=args.max_black_box_masks,
                             **{k: getattr(args, k) for k in SERVE_OPERATION_KEYS})

    try:
        settings = settings_now()
        if args.check_config:
            return check_config(settings)
        server = Server(settings).start()
    except (ConfigError, ValueError, OSError) as exc:
        return fail("serve", str(exc))

    def announce() -> None:
        print(f"xaiserve: serving {settings.repository} on port {server.port}", flush=True)
        if server.rest is not None:
            print(f"xaiserve: REST at http{'s' if server.tls else ''}://{settings.host}:"
                  f"{server.rest.port}/v2", flush=True)
        if server.metrics_port:
            print(f"xaiserve: metrics at http://{settings.host}:{server.metrics_port}/metrics",
                  flush=True)
    server.serve_forever(reload=settings_now, watch=args.config if args.watch_config else None,
                         announce=announce)
    # In-flight requests have had their grace period and gRPC has cancelled the rest; a
    # handler thread still finishing cancelled work, or model teardown, must not hold the exit.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def check_config(settings) -> int:
    """What `serve` checks before it compiles anything, for a pipeline to run before a rollout
    (as `nginx -t`): raises what serve would fail with; prints the models it would load."""
    from ..config import unmatched_model_names
    from ..repository import ModelRepository, missing_pins_warning, plan_versions, scan
    from ..security import read_tokens, server_credentials

    server_credentials(settings)
    read_tokens(settings.token_file)
    ModelRepository(settings).check_devices()
    on_disk, unreadable, unexported = scan(settings.repository)
    for name, reason in sorted(unreadable.items()):
        print(f"xaiserve serve: warning: cannot read {settings.repository / name} ({reason})",
              file=sys.stderr)
    for _, hint in sorted(unexported.items()):
        print(f"xaiserve serve: warning: {hint}", file=sys.stderr)
    for warning in unmatched_model_names(settings, sorted(on_disk)):
        print(f"xaiserve serve: warning: {warning}", file=sys.stderr)
    models = []
    for name, versions in sorted(on_disk.items()):
        model = settings.for_model(name)
        served, _ = plan_versions(versions, model, failed=set())
        warning = missing_pins_warning(name, model, versions)
        if warning:
            print(f"xaiserve serve: warning: {warning}", file=sys.stderr)
        models.append(f"{name} versions {sorted(served)} on {model.device}" if served
                      else f"no version of {name} (none on disk fits the config)")
    print(f"xaiserve serve: config ok; would load {'; '.join(models) or 'no model'}")
    return 0
