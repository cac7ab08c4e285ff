"""Whether a version folder's files are whole, before the server compiles them.

A version should arrive by rename (written in a hidden folder, then moved into place, as
`xaiserve export` does), but operators copy too. A copy caught half-way must not be served:
a `model.bin` reserved at its full size and then filled (what several copy tools do) compiles
and answers, with the weights it has so far. Two checks, both cheap next to a compile:
- the export records each file's SHA-256 in `model_card.json` (`files`): a file that does not
  match is not whole yet (or damaged), and the version waits until its files change again;
- files changed within the last SETTLE_SECONDS are still being written: the version waits for
  them to be quiet (the only check for an IR that came without a card).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

CARD_NAME = "model_card.json"
SETTLE_SECONDS = 2.0
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digests(version_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """{file name: SHA-256} of the named files, for the model card."""
    return {name: sha256_file(version_dir / name) for name in names}


def files_signature(version_dir: Path) -> tuple:
    """(name, size, mtime) of a version's files: changes when a copy into it goes on."""
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in version_dir.iterdir()
                            if p.is_file() for st in [p.stat()]))
    except OSError:  # removed while we looked: the next scan drops it
        return ()


def quiet(signature: tuple, now_ns: int | None = None) -> bool:
    """Whether no file of a `files_signature` changed in the last SETTLE_SECONDS."""
    if not signature:
        return False
    newest = max(mtime for _, _, mtime in signature)
    now_ns = time.time_ns() if now_ns is None else now_ns
    return now_ns - newest >= SETTLE_SECONDS * 1e9


def mismatch(version_dir: Path) -> str:
    """Why the files are not those the card lists ("" when they are, or when there is no card
    or no list): the first file missing or with another SHA-256."""
    try:
        listed = json.loads((version_dir / CARD_NAME).read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return ""  # no card (an IR from elsewhere), or one without a readable list
    for name, expected in sorted(listed.items()):
        path = version_dir / name
        if Path(name).name != name or not path.is_file():  # a plain name in this folder
            return f"{name} listed in {CARD_NAME} is missing (a copy under way?)"
        if sha256_file(path) != expected:
            return (f"{name} does not match the SHA-256 in {CARD_NAME} (a copy under way, or a "
                    "damaged file); loaded once its files change")
    return ""
