"""Writes to a model repository in the OpenVINO Model Server layout,
`<repository>/<name>/<version>/model.xml`, atomically: a version directory appears whole or not
at all, because it is written under a hidden temporary name and renamed into place."""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from xaiserve.service.layout import version_dirs

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    pass


class InterruptedAfterWriting(KeyboardInterrupt):
    """A signal arrived after the version was renamed into place: it is there, whole, and a
    caller must not report that nothing was written."""

    def __init__(self, reason: str, path: Path):
        super().__init__(reason)
        self.reason, self.path = reason, path


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


def check_target(repository: Path, name: str, version: int | None) -> None:
    """What `staged_version` would refuse, checked before an export's slow steps (an INT8
    export can take many minutes before it writes)."""
    check_name(name)
    repository = Path(repository)
    if version is not None and not 1 <= version < 10**18:  # the server reads up to 18 digits
        raise RepositoryError(f"--version {version}: versions are 1 to 18 digits")
    for folder in (repository, repository / name):
        if folder.exists() and not folder.is_dir():
            raise RepositoryError(f"--repository {repository}: {folder} is a file, not a folder")
    if version is not None and (repository / name / str(version)).exists():
        raise RepositoryError(f"{repository / name / str(version)} exists; give another "
                              "--version or leave it out")
    if version is not None and (repository / name / f".staging-{version}").exists():
        raise _staging_taken(repository / name / f".staging-{version}", version)


def _staging_taken(staging: Path, version: int) -> RepositoryError:
    return RepositoryError(f"{staging}: another export of version {version} is under way (or "
                           "one was killed: remove that folder), or leave --version out")


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or would: its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def out_of_space(repository: Path, needed: int) -> RepositoryError:
    free = free_bytes(repository) / 2**20
    why = (f"{free:.1f} MiB free on its file system, it needs about {needed / 2**20:.1f} MiB"
           if free * 2**20 < needed else f"a write found its file system full; {free:.1f} MiB "
           "free now")
    return RepositoryError(f"--repository {repository}: no room for the version ({why}); free "
                           "some space or give another --repository")


def claim_version(model_dir: Path, version: int | None) -> tuple[Path, int]:
    """Make `<model_dir>/.staging-<N>` for the version (the next free one when None) and return
    it with N. mkdir either makes the folder or fails, so two exports running at once never
    choose the same number (both took the next one and the second lost its work to a failed
    rename); a staging folder left by a killed export is skipped over."""
    chosen = version if version is not None else next_version(model_dir)
    for _ in range(1000):
        final, staging = model_dir / str(chosen), model_dir / f".staging-{chosen}"
        if final.exists() and version is not None:
            raise RepositoryError(f"{final} exists; give another --version or leave it out")
        if not final.exists():
            try:
                staging.mkdir(mode=0o700)  # private until whole (the rename makes it 0755)
                return staging, chosen
            except FileExistsError:
                if version is not None:
                    raise _staging_taken(staging, version) from None
        chosen += 1
    raise RepositoryError(f"{model_dir}: no free version number found after {chosen}")


@contextmanager
def staged_version(repository: Path, name: str, version: int | None,
                   size_hint: int = 0) -> Iterator[tuple[Path, int]]:
    """Yield a temporary directory to fill; on success it becomes `<name>/<version>`.

    On any error the temporary directory goes, and so do `<name>/` and the repository if this
    call created them. `size_hint` (bytes the version will take) refuses a file system without
    room before anything is written, and names the cause when a write fails for want of it
    (OpenVINO's writer reports only "iostream error")."""
    check_target(repository, name, version)
    if size_hint and free_bytes(repository) < size_hint:
        raise out_of_space(repository, size_hint)
    model_dir = Path(repository) / name
    created = not model_dir.exists()
    new_repository = not Path(repository).exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    # made here: readable by a server running as another user, even under umask 077
    for folder in [model_dir] * created + [Path(repository)] * new_repository:
        folder.chmod(0o755)
    staging, chosen = claim_version(model_dir, version)
    final = model_dir / str(chosen)
    try:
        yield staging, chosen
        for item in staging.iterdir():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        # the staging folder is private (0700); servers run as other users (the runtime
        # image's uid 10001, systemd's DynamicUser) and must read it, as they read its files.
        staging.chmod(0o755)
        for item in staging.iterdir():  # under umask 077 they would be 0600
            item.chmod(0o644)
        os.rename(staging, final)
        _sync_folder(model_dir)
    except BaseException as exc:
        if final.exists() and not staging.exists():  # renamed: the version is there, whole
            if isinstance(exc, KeyboardInterrupt):
                raise InterruptedAfterWriting(str(exc) or "interrupted", final) from None
            raise
        shutil.rmtree(staging, ignore_errors=True)
        for folder in [model_dir] * created + [Path(repository)] * new_repository:
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or isinstance(exc, Exception) and free_bytes(repository) < size_hint:
            raise out_of_space(repository, size_hint) from exc
        raise


def _sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable: a crash just after it keeps the new version."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
