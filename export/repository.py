"""Writes to a model repository in the OpenVINO Model Server layout,
`<repository>/<name>/<version>/model.xml`, atomically: a version directory appears whole or not
at all, because it is written under a hidden temporary name and renamed into place."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from xaiserve.service.repository import version_dirs

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    pass


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RepositoryError(
            f"--name {name!r}: use letters, digits, '_', '.', '-' (no path separators)"
        )
    return name


def versions(model_dir: Path) -> list[int]:
    """Every numeric version directory, complete or not, so a new version never collides."""
    return sorted(version_dirs(model_dir))


def next_version(model_dir: Path) -> int:
    existing = versions(model_dir)
    return existing[-1] + 1 if existing else 1


@contextmanager
def staged_version(repository: Path, name: str, version: int | None) -> Iterator[tuple[Path, int]]:
    """Yield a temporary directory to fill; on success it becomes `<name>/<version>`.

    On any error the temporary directory goes, and so does `<name>/` if this call created it."""
    check_name(name)
    model_dir = Path(repository) / name
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    chosen = version if version is not None else next_version(model_dir)
    if chosen < 1:
        raise RepositoryError(f"--version {chosen}: versions are positive integers")
    final = model_dir / str(chosen)
    if final.exists():
        raise RepositoryError(f"{final} exists; give another --version or leave it out")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{chosen}-", dir=model_dir))
    try:
        yield staging, chosen
        for item in staging.iterdir():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and model_dir.exists() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
