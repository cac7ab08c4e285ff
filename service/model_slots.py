"""Per-model caps on concurrent requests, under the server-wide one.

One model's flood (a black-box explanation takes seconds) could take every server slot and
leave the other models on the server refused. A model's `max_requests_in_flight` (0: none)
bounds its share; beyond it its requests get RESOURCE_EXHAUSTED at once, as beyond the
server's. Limits are read from the current settings, so a reloaded config applies to new
requests (those in flight finish on the semaphore they took).
"""

from __future__ import annotations

import threading
from typing import Callable


def _nothing() -> None:
    pass


class ModelSlots:
    def __init__(self, limit: Callable[[str], int], served: Callable[[str], bool]):
        self.limit = limit  # model name -> its cap (0: none)
        self.served = served  # only served names get a semaphore: request names are untrusted
        self._semaphores: dict[str, tuple[int, threading.BoundedSemaphore]] = {}
        self._lock = threading.Lock()

    def take(self, model: str) -> Callable[[], None] | None:
        """The release of a slot of `model` (a no-op where it has no cap), or None when every
        slot is taken."""
        limit = self.limit(model)
        if not limit or not self.served(model):
            return _nothing
        with self._lock:
            held = self._semaphores.get(model)
            if held is None or held[0] != limit:
                held = self._semaphores[model] = (limit, threading.BoundedSemaphore(limit))
        semaphore = held[1]
        return semaphore.release if semaphore.acquire(blocking=False) else None
