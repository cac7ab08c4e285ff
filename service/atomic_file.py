"""Output files that appear whole or not at all.

A pipeline that polls for `bench.json` or an export's `--report`, or a person opening a report
while it is rewritten, must never read half a file; an interrupted run (SIGTERM, a full disk)
must leave the previous file as it was. Each file is written under a hidden name beside it,
flushed to disk and renamed over the old one (a rename within a folder is atomic on POSIX).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def replacing(path: Path | str, mode: str = "w", **open_options) -> Iterator[IO]:
    """An open file that replaces `path` when the block ends without an exception; on any
    exception (KeyboardInterrupt included) the partial file is removed and `path` untouched."""
    path = Path(path)
    if path.is_symlink():  # replace the file it names, not the link
        path = path.resolve()
    staged = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(staged, mode, **open_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write or fsync names no file: name the output
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    with replacing(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_bytes(path: Path | str, data: bytes) -> None:
    with replacing(path, "wb") as handle:
        handle.write(data)
