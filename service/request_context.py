"""What the server knows about the request being handled, readable anywhere on its thread.

The interceptor opens one record per RPC; handlers add what only they know (the forward passes
of a black-box explanation) and log lines emitted meanwhile carry its request id."""

from __future__ import annotations

import contextvars
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass
class RequestRecord:
    method: str
    request_id: str = ""
    model: str = ""
    version: str = ""
    forward_passes: int | None = None  # set by a black-box explanation
    trace_id: str = ""  # from the client's W3C `traceparent`, to join its traces to our logs
    span_id: str = ""  # the client's span that made the call
    token_id: str = ""  # which of the server's tokens the call carried (security.token_id)
    protocol: str = "grpc"  # or "http": the REST side of the protocol (service.rest)


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "xaiserve_request", default=None)


def new_request_id() -> str:
    """32 random hex digits, as unique as a UUID4's: the uuid module builds an object per call,
    which took 68 against 17 us on a request here."""
    return os.urandom(16).hex()


def trace_context(metadata) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C `traceparent` in the call's metadata
    ("00-<32 hex>-<16 hex>-<2 hex>", as OpenTelemetry's gRPC instrumentation sends it), or
    ("", "") when there is none or it is malformed (the spec: ignore it then)."""
    for key, value in metadata or ():
        if key != "traceparent":
            continue
        parts = value.split("-") if isinstance(value, str) else []
        if (len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff"
                and len(parts[1]) == 32 and len(parts[2]) == 16 and len(parts[3]) == 2
                and all(_is_lower_hex(p) for p in parts[:4])
                and parts[1].strip("0") and parts[2].strip("0")
                and (parts[0] != "00" or len(parts) == 4)):
            return parts[1], parts[2]
        return "", ""
    return "", ""


def _is_lower_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def current() -> RequestRecord | None:
    return _CURRENT.get()


def enter(record: RequestRecord) -> contextvars.Token:
    return _CURRENT.set(record)


def leave(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


def note_forward_passes(count: int) -> None:
    """Called by a black-box explainer: the number of masked images it scored."""
    record = _CURRENT.get()
    if record is not None:
        record.forward_passes = (record.forward_passes or 0) + int(count)


@dataclass
class ClientWait:
    """Whether the client still waits for this call. gRPC ends a call when its client cancels,
    its deadline passes or its connection drops, and the handler is not told: long work
    (black-box masks, the wait for a black-box slot) asks here, so that it stops instead of
    holding slots and cores for nobody."""

    ended: threading.Event
    deadline: float | None = None  # time.monotonic() instant

    @classmethod
    def of(cls, context) -> "ClientWait":
        ended = threading.Event()
        if not context.add_callback(ended.set):
            ended.set()
        remaining = context.time_remaining()
        return cls(ended, None if remaining is None else time.monotonic() + remaining)

    def gone(self) -> str:
        """Why the client no longer waits ("cancelled", "deadline passed"), or "" while it
        does."""
        return abort_reason(self.deadline, self.ended)

    def acquire(self, slots: threading.Semaphore, timeout: float) -> bool:
        """Take a slot within `timeout` seconds while the client still waits; False when the
        time ran out or the client went."""
        give_up = time.monotonic() + timeout
        while not self.gone():
            if slots.acquire(timeout=min(0.05, max(0.0, give_up - time.monotonic()))):
                return True
            if time.monotonic() >= give_up:
                return False
        return False

    def watching(self, work: Callable[..., T]) -> Callable[..., T]:
        """`work`, refusing to start (ClientGone) once the client no longer waits: long work
        made of many calls (the faithfulness curves' batches) stops between two of them."""
        def watched(*args, **kwargs) -> T:
            reason = self.gone()
            if reason:
                raise ClientGone(reason)
            return work(*args, **kwargs)
        return watched


class ClientGone(RuntimeError):
    """Long work stopped because its client no longer waits; `reason` is abort_reason's
    ("cancelled", "deadline passed")."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def abort_reason(deadline: float | None, cancel: threading.Event | None) -> str:
    """"deadline passed" once `deadline` (a time.monotonic() instant) is past, "cancelled" once
    `cancel` is set, else "". The deadline first: gRPC also ends a call whose deadline passed."""
    if deadline is not None and time.monotonic() >= deadline:
        return "deadline passed"
    return "cancelled" if cancel is not None and cancel.is_set() else ""
