"""The round trip a gRPC call pays outside its handler, with no xaiserve code in the way.

A bare Python gRPC server (a generic unary handler, its own process) and a client on loopback.
The handler waits a given time, asleep or spinning, and returns its own start and end
(`time.perf_counter`, CLOCK_MONOTONIC, the same clock in both processes); the client subtracts
the handler's time from its own. With a handler of zero, that is the floor benchmark_app-like
back-to-back loops see; with a handler as long as an inference, it is the floor an Explain
sees, because client and server threads (and, in a VM, their vCPUs) go idle meanwhile and
must be woken. benchmarks/serving_speed.py measures the same with ServerLive after a pause.

    .venv/bin/python benchmarks/grpc_idle_floor.py --handler-ms 0 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent import futures

import grpc

METHOD = "/floor.Floor/Call"


def handler(request: bytes, context) -> bytes:
    started = time.perf_counter()
    wait_s, spin = float(request[:16].decode()), request[16:17] == b"s"
    if spin:
        while time.perf_counter() - started < wait_s:
            pass
    else:
        time.sleep(wait_s)
    return f"{started!r} {time.perf_counter()!r}".encode()


def serve(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Floor", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def measure(call, wait_ms: float, spin: bool, calls: int, payload: int) -> dict:
    """Median ms: client send -> handler start, handler end -> client receive, and their sum."""
    request = f"{wait_ms / 1e3:<16}".encode() + (b"s" if spin else b"z") + b"x" * payload
    for _ in range(20):
        call(request)
    inbound, outbound = [], []
    for _ in range(calls):
        sent = time.perf_counter()
        start, end = map(float, call(request).split())
        received = time.perf_counter()
        inbound.append((start - sent) * 1e3)
        outbound.append((received - end) * 1e3)
    return {"in": statistics.median(inbound), "out": statistics.median(outbound),
            "outside": statistics.median(i + o for i, o in zip(inbound, outbound))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handler-ms", type=float, nargs="+", default=[0.0, 7.0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--payload", type=int, default=14_000, help="request bytes (a JPEG)")
    parser.add_argument("--port", type=int, default=9931)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the gRPC server did not start")
        with grpc.insecure_channel(f"127.0.0.1:{args.port}") as channel:
            call = channel.unary_unary(METHOD)
            print(f"{'handler':>12} {'kind':>6} {'in ms':>7} {'out ms':>7} {'outside':>8}")
            for wait_ms in args.handler_ms:
                for spin in ((False, True) if wait_ms else (False,)):
                    r = measure(call, wait_ms, spin, args.calls, args.payload)
                    print(f"{wait_ms:9.1f} ms {'spin' if spin else 'sleep':>6} {r['in']:7.3f} "
                          f"{r['out']:7.3f} {r['outside']:8.3f}")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
