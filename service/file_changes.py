"""Noticing that a file was replaced, for what is read again without a restart (the config,
certificates, the token): by its identity, not its contents."""

from __future__ import annotations

import threading
import time
from pathlib import Path

# Rotated files (a Kubernetes Secret, cert-manager's certificates) are looked at no more often
RECHECK_SECONDS = 1.0


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) through symlinks, which is how a ConfigMap or Secret volume swaps a
    file; None while it is not there (removed for a moment)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class RotatedFiles:
    """Whether any of some files changed since the last call, looked at once a second (the
    call is on every request and handshake: most return before taking the lock)."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._lock = threading.Lock()
        self._seen = self._identity()
        self._next = time.monotonic() + RECHECK_SECONDS

    def _identity(self) -> tuple:
        return tuple(file_identity(p) for p in self.paths)

    def changed(self) -> bool:
        if time.monotonic() < self._next:
            return False
        with self._lock:
            now = time.monotonic()
            if now < self._next:  # another thread looked meanwhile
                return False
            self._next = now + RECHECK_SECONDS
            identity = self._identity()
            if identity == self._seen:
                return False
            self._seen = identity
            return True
