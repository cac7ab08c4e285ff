"""Bidirectional streams of unary requests (Triton's ModelStreamInfer): every message is run
as one call through the RequestInterceptor (the caps, the request id, the metrics and the
access log, as a unary call gets them; the token is checked once, when the stream opens) on a
shared pool, and answered on the stream in the order the requests came.

A message that fails (bad input, a cap, an unreadable protobuf) answers with its error and the
stream goes on, so one bad frame from a camera does not end the others. A stream holds one of
the server's gRPC threads for as long as it is open, so their number is capped
(max_open_streams) and the server's pool has that many threads on top of the unary calls'
(service.server): open streams never starve unary calls."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc

from .detached_call import CallAborted, DetachedCall
from .errors import RETRY_LATER

log = logging.getLogger("xaiserve.server")

# messages of one stream in flight at once: a client that sends frames faster than they are
# answered is slowed by HTTP/2 flow control beyond this, instead of queueing in the server
STREAM_DEPTH = 8


@dataclass(frozen=True)
class Unreadable:
    """A stream message that is not a valid protobuf of its type (answered with an error)."""

    error: str


class CallerStream:
    """A stream's requests as the interceptor hands them on: read leniently (Unreadable in
    place of a message gRPC would have ended the stream for), with the id of the token the
    stream was opened with."""

    def __init__(self, raw_messages: Iterable[bytes], deserialize: Callable[[bytes], object],
                 caller: str):
        self.raw_messages, self.deserialize, self.caller = raw_messages, deserialize, caller

    def __iter__(self) -> Iterator[object]:
        for raw in self.raw_messages:
            try:
                yield self.deserialize(raw)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, bad UTF-8
                yield Unreadable(f"{type(exc).__name__}")


class StreamMessageCall(DetachedCall):
    """One message of a stream: the stream's metadata and deadline; compression asked for a
    large answer applies to the stream."""

    def __init__(self, stream_context):
        super().__init__(stream_context.invocation_metadata(), stream_context.time_remaining)
        self.stream_context = stream_context

    def set_compression(self, compression: grpc.Compression) -> None:
        super().set_compression(compression)
        self.stream_context.set_compression(compression)


@dataclass(frozen=True)
class StreamAnswers:
    """How one streaming method answers: `handler` is the unary servicer method run per
    message; `reply` wraps its response for the stream, `failure(request, code, message)`
    writes the answer of a message that failed (request: None when it was unreadable)."""

    method: str  # the name its messages are counted and logged under
    handler: Callable[[object, object], object]
    reply: Callable[[object], object]
    failure: Callable[[object | None, grpc.StatusCode, str], object]


class MessageStreams:
    def __init__(self, gate, workers: int, max_open: int, depth: int = STREAM_DEPTH):
        self.gate = gate  # the RequestInterceptor
        self.open_gauge = gate.telemetry.open_streams
        self.pool = futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="xaiserve-stream")
        self.max_open = max_open
        self.open = threading.BoundedSemaphore(max_open)
        self.depth = depth

    def answer(self, requests: CallerStream, context, answers: StreamAnswers) -> Iterator:
        """The stream's answers, one per request, in the requests' order."""
        if not self.open.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server holds its maximum of {self.max_open} open streams "
                          "(one ends when its client closes it); send unary calls meanwhile"
                          + RETRY_LATER)
        self.open_gauge.inc()
        return OpenStream(self, requests, context, answers).answers()

    def closed(self) -> None:
        self.open_gauge.dec()
        self.open.release()

    def run_message(self, request, call: StreamMessageCall, answers: StreamAnswers,
                    caller: str):
        """One message as a call through the interceptor -> its answer on the stream."""
        try:
            if isinstance(request, Unreadable):
                self.gate.refuse(call, answers.method, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"a {answers.method} message is not a valid protobuf message "
                                 f"of its type ({request.error}); build it with the stubs "
                                 "generated from protos/")
            return answers.reply(self.gate.handle(answers.method, answers.handler, request,
                                                  call, caller))
        except CallAborted as exc:
            return answers.failure(None if isinstance(request, Unreadable) else request,
                                   exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - the stream and the server go on
            log.exception("%s message failed", answers.method)
            return answers.failure(None, grpc.StatusCode.INTERNAL,
                                   f"{type(exc).__name__}: {exc}"[:500])

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class OpenStream:
    """One stream from its opening (its place among max_open taken) to its end, whichever way
    it ends: the client closes its side, cancels or goes, or the deadline passes. Set up
    before gRPC first asks for an answer, so that a stream cancelled at once gives its place
    back too."""

    def __init__(self, streams: MessageStreams, requests: CallerStream, context,
                 answers: StreamAnswers):
        self.streams, self.requests, self.context = streams, requests, context
        self.method_answers = answers
        self.pending: queue.Queue = queue.Queue()  # (call, future) in request order; None: end
        self.room = threading.Semaphore(streams.depth)
        self.in_flight: set[StreamMessageCall] = set()
        self.lock = threading.Lock()
        self.ended = threading.Event()
        if not context.add_callback(self.end):
            self.end()
        # a thread of its own, so that answers go out while the next request is awaited
        threading.Thread(target=self.read, name="xaiserve-stream-reader", daemon=True).start()

    def end(self) -> None:
        """gRPC's callback when the stream is over: once."""
        self.ended.set()
        with self.lock:
            calls = list(self.in_flight)
        for call in calls:  # long work of these messages stops (ClientWait)
            call.end()
        self.streams.closed()

    def read(self) -> None:
        try:
            for request in self.requests:
                while not self.room.acquire(timeout=0.1):
                    if self.ended.is_set():
                        return
                if self.ended.is_set():
                    return
                call = StreamMessageCall(self.context)
                with self.lock:
                    self.in_flight.add(call)
                self.pending.put((call, self.streams.pool.submit(
                    self.streams.run_message, request, call, self.method_answers,
                    self.requests.caller)))
        except Exception:  # noqa: BLE001 - gRPC's iterator raises when the client cancels
            pass
        finally:
            self.pending.put(None)

    def answers(self) -> Iterator:
        while (item := self.pending.get()) is not None:
            call, future = item
            answer = future.result()
            with self.lock:
                self.in_flight.discard(call)
            call.end()  # its metrics and access log line
            self.room.release()
            yield answer
