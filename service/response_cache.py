"""Answers kept for requests seen before, as Triton's response cache: an explanation costs up
to thousands of inferences (RISE), and a dashboard, a review queue or several people looking at
the same flagged image ask for the same one again.

A request's key is a hash of what decides its answer: the method, the model's name and
version, the files and settings that version was compiled from, and the request message
itself without its id. Explanations are deterministic for a key (RISE's masks come from the
request's seed), so a cached answer is one the model would give. The cache holds serialized
responses, least recently used dropped first, within `max_bytes`; requests whose data lies in
shared memory are not cached (their bytes are not in the message).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import Message


@dataclass(frozen=True)
class CacheTotals:
    entries: int
    bytes: int
    hits: int
    misses: int


def request_key(method: str, name: str, version: int, compiled_from: str,
                request: Message) -> bytes:
    """The key of a request's answer: everything but its id (echoed, not computed)."""
    digest = hashlib.blake2b(digest_size=32)
    for part in (method, name, str(version), compiled_from):
        digest.update(part.encode())
        digest.update(b"\0")
    request_id = request.id
    request.id = ""  # serialised without it, then given back
    try:
        digest.update(request.SerializeToString(deterministic=True))
    finally:
        request.id = request_id
    return digest.digest()


class ResponseCache:
    """Serialized responses by key, least recently used first out; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            answer = self._entries.get(key)
            if answer is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return answer

    def put(self, key: bytes, answer: bytes) -> None:
        """Keep an answer; one larger than the whole cache is not kept."""
        size = len(answer) + len(key)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= len(previous) + len(key)
            self._entries[key] = answer
            self._bytes += size
            while self._bytes > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._bytes -= len(old) + len(old_key)

    def totals(self) -> CacheTotals:
        with self._lock:
            return CacheTotals(len(self._entries), self._bytes, self._hits, self._misses)


class CachedAnswers:
    """How the servicers use the cache: whether a request may be cached, an answer from a hit
    (its id the request's, its timings the lookup's), and the keeping of a computed answer;
    the version's statistics count hits and misses as Triton's do."""

    def __init__(self, cache: ResponseCache, model_caches: Callable[[str], bool]):
        self.cache = cache
        self.model_caches = model_caches  # by model name: the current config's response_cache

    def answer(self, method: str, state, request: Message, in_shared_memory: bool,
               response_type: type[Message], compute: Callable[[], Message],
               mark_hit: Callable[[Message, float], None],
               images: Callable[[Message], int] = lambda response: 1) -> Message:
        """`compute()`'s answer, or the one kept for the same request."""
        if not self.cache.enabled or in_shared_memory or not self.model_caches(state.name):
            return compute()
        started = time.perf_counter_ns()
        key = request_key(method, state.name, state.version,
                          repr((state.files, state.settings)), request)
        kept = self.cache.get(key)
        if kept is not None:
            response = response_type.FromString(kept)
            response.id = request.id
            elapsed = time.perf_counter_ns() - started
            mark_hit(response, elapsed / 1e6)
            state.statistics.record_cache_hit(images(response), elapsed)
            return response
        lookup_ns = time.perf_counter_ns() - started
        response = compute()
        kept_from = time.perf_counter_ns()
        response_id = response.id
        response.id = ""  # a hit gets its own request's id
        try:
            self.cache.put(key, response.SerializeToString())
        finally:
            response.id = response_id
        state.statistics.record_cache_miss(lookup_ns + time.perf_counter_ns() - kept_from)
        return response
