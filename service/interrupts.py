"""SIGTERM and SIGINT as KeyboardInterrupt, raised where it is safe to raise one.

A pipeline's timeout, `kill` and Kubernetes send SIGTERM, whose default action ends the process
on the spot: an export's staging folder stays behind and a bench's child benchmark_app runs on.
Raised as KeyboardInterrupt instead, the `finally` blocks clean up. But an exception raised in
the middle of an import (torch's take seconds) can reach C++ code that cannot pass it on: the
process aborted (SIGABRT), or CPython marked it as killed by SIGINT whatever exit code it
chose (6 of 40 SIGTERMs in the first seconds of an export here; 0 of 33 since). So a signal
that arrives inside an import is raised again once the import is over.

A child forked while these handlers are installed gets the default SIGTERM and SIGINT back.
OpenVINO's telemetry sends each event from a forked multiprocessing child; one that inherited a
C lock held by another thread (the dynamic loader's, in getaddrinfo) waits on it for ever, and
with our handler it never runs Python again to act on SIGTERM, so the export's exit, which
terminates and joins such children, waited for ever too (seen in CI).
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RETRY_S = 0.05


def inside_import(frame: FrameType | None) -> bool:
    """Whether Python is executing a module's import (its frames run under importlib's)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_OURS: set = set()  # the handlers installed now, which a forked child must not keep


def _default_handlers_in_child() -> None:
    for sig in SIGNALS:
        if signal.getsignal(sig) in _OURS:
            signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_handlers_in_child)


@contextmanager
def _handled_by(handler) -> Iterator[None]:
    """SIGTERM and SIGINT go to `handler` within the block; the handlers before come back."""
    _OURS.add(handler)
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
        _OURS.discard(handler)


@contextmanager
def interrupts_raised() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise KeyboardInterrupt("SIGTERM" or "SIGINT");
    later signals are ignored, so that they cannot cut the clean-up short. A signal put off by
    an import that the block outlives is dropped: the work it would have stopped is done."""
    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        if inside_import(frame):  # deliver it again to the main thread a moment later
            threading.Timer(RETRY_S, _thread.interrupt_main, args=(signum,)).start()
            return
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with _handled_by(raise_interrupt):
        yield


@dataclass
class DeferredInterrupt:
    """What `interrupts_deferred` saw: the first signal's name, or ""."""

    signal: str = ""


@contextmanager
def interrupts_deferred() -> Iterator[DeferredInterrupt]:
    """Within the block SIGTERM and SIGINT are noted, not raised: for short work that must not
    stop half-way, such as writing a report's files, which a signal would leave part new and
    part stale. The caller reads `.signal` afterwards and ends as interrupted."""
    seen = DeferredInterrupt()

    def note(signum: int, frame: FrameType | None) -> None:
        seen.signal = seen.signal or signal.Signals(signum).name

    with _handled_by(note):
        yield seen
