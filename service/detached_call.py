"""A request handled outside a unary gRPC call, as the servicer context the interceptor and the
handlers see: an HTTP exchange (service.rest) or one message of a stream
(service.message_stream). They call only abort, code, invocation_metadata, time_remaining,
set_compression and add_callback on it; here abort raises instead of ending a gRPC call, and
the callbacks run once, when the request's answer has been handed over (or its client left),
so long work stops for a client that is gone."""

from __future__ import annotations

import threading
from typing import Callable

import grpc


class CallAborted(Exception):
    """DetachedCall.abort: ends the handler as gRPC's context.abort does."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class DetachedCall:
    def __init__(self, metadata, time_remaining: Callable[[], float | None] = lambda: None):
        self.metadata = tuple(metadata)
        self._time_remaining = time_remaining
        self.compression = grpc.Compression.NoCompression
        self._code: grpc.StatusCode | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        self._lock = threading.Lock()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def abort(self, code: grpc.StatusCode, details: str):
        self._code = code
        raise CallAborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._time_remaining()

    def set_compression(self, compression: grpc.Compression) -> None:
        self.compression = compression

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        return False

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended, callbacks = True, self._callbacks
        for callback in callbacks:
            callback()
