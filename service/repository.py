"""The served model repository (OpenVINO Model Server layout), kept in step with the disk.

A watcher thread compares `<repository>/<name>/<version>/model.xml` with what is loaded: new
versions are compiled in the background (a slow compile never blocks requests to other models).
A version leaves the table once the versions that replace it are ready (older than
`latest_versions`, or removed from disk: its weights are in memory), so unversioned requests
always find one; requests already holding a version finish on it. A version that fails to load
stays listed, not ready, with the reason, takes no place among the `latest_versions` (the one
before it serves instead), and is loaded again once its files change (a copy that was caught
half-way). Loaded models own their weights (`model.read_ir`), so files changing under a served
version cannot take the process down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import openvino as ov

from .config import ModelSettings, ServerSettings
from .errors import NotServed, shown
from .layout import export_hint, foreign_model_files, version_dirs, version_number
from .model import ClassifierModel, error_reason
from .statistics import VersionStatistics
from .version_files import SETTLE_SECONDS, files_signature, mismatch, quiet

log = logging.getLogger("xaiserve.repository")


@dataclass
class VersionState:
    name: str
    version: int
    path: Path
    model: ClassifierModel | None = None
    error: str | None = None
    statistics: VersionStatistics = field(default_factory=VersionStatistics)
    files: tuple = ()  # files_signature() when its load began
    removed: bool = False  # its directory is gone; still served until replaced
    settings: ModelSettings | None = None  # what its model was compiled (or tried) with

    @property
    def ready(self) -> bool:
        return self.model is not None


class RepositoryUnreadable(OSError):
    """The repository folder itself is gone or cannot be listed (a volume remounting, a folder
    swapped by two renames): what is loaded keeps serving until it is back."""


class Scan(NamedTuple):
    found: dict[str, dict[int, Path]]  # every `<name>/<int>/model.xml`, staging dirs skipped
    unreadable: dict[str, str]  # {name: reason}: neither loaded nor dropped
    unexported: dict[Path, str]  # {version dir: export_hint} for other model files only


def scan(repository: Path) -> Scan:
    """What the repository holds (see Scan)."""
    found: dict[str, dict[int, Path]] = {}
    unreadable: dict[str, str] = {}
    unexported: dict[Path, str] = {}
    try:
        model_dirs = sorted(repository.iterdir())
    except OSError as exc:
        raise RepositoryUnreadable(exc.errno, exc.strerror, str(repository)) from None
    for model_dir in model_dirs:
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        try:
            complete: dict[int, Path] = {}
            for version, version_dir in version_dirs(model_dir).items():
                if (version_dir / "model.xml").is_file():
                    complete[version] = version_dir
                elif files := foreign_model_files(version_dir):
                    unexported[version_dir] = export_hint(version_dir, files)
        except OSError as exc:  # a folder this server may not read: the others still count
            unreadable[model_dir.name] = exc.strerror or str(exc)
            continue
        if complete:
            found[model_dir.name] = complete
    return Scan(found, unreadable, unexported)


def plan_versions(on_disk: dict[int, Path], policy: ModelSettings,
                  failed: set[int]) -> tuple[dict[int, Path], dict[int, Path]]:
    """(versions to serve, failed versions to list) of one model. With `policy.versions`
    (Triton's "specific"), those of them on disk; else the newest `latest_versions` on disk
    (every one for 0; OVMS's and Triton's "latest") that have not failed to load: a failed
    version takes no place, the one before it serves instead, so a broken newest export falls
    back to the last good one. Failed versions newer than the oldest one served (or pinned)
    stay listed, not ready, with their reason."""
    serve: dict[int, Path] = {}
    listed: dict[int, Path] = {}
    for version in sorted(on_disk, reverse=True):
        if policy.versions is not None and version not in policy.versions:
            continue
        if policy.latest_versions and len(serve) == policy.latest_versions \
                and policy.versions is None:
            break
        (listed if version in failed else serve)[version] = on_disk[version]
    return serve, listed


def missing_pins_warning(name: str, policy: ModelSettings, on_disk: dict[int, Path]) -> str:
    """What the server logs and `--check-config` prints when the config pins versions of
    `name` that are not on its disk (a typo in a rollback), or "" when none is missing."""
    missing = [v for v in policy.versions or () if v not in on_disk]
    if not missing:
        return ""
    return f"{name}: the config pins versions {missing}, not on disk (has {sorted(on_disk)})"


@dataclass(frozen=True)
class IndexEntry:
    """One version in the repository index (Triton's RepositoryIndex states)."""

    name: str
    version: int
    state: str  # READY, LOADING, UNAVAILABLE
    reason: str = ""


def index_entries(on_disk: dict[str, dict[int, Path]], listed: list[VersionState],
                  settings: Callable[[str], ModelSettings]) -> list[IndexEntry]:
    """Every version on disk, in the table or pinned by the config, by name and version: what
    it is doing and why it is not served (failed, outside the version policy, removed, pinned
    but not on disk)."""
    table = {(s.name, s.version): s for s in listed}
    pinned = {(n, v) for n in on_disk.keys() | {s.name for s in listed}
              for v in settings(n).versions or ()}
    entries = []
    for key in sorted(table.keys() | pinned | {(n, v) for n, vs in on_disk.items() for v in vs}):
        state = table.get(key)
        if state is None and key[1] not in on_disk.get(key[0], {}):
            entries.append(IndexEntry(*key, "UNAVAILABLE", "pinned by the config, not on disk"))
        elif state is None:
            entries.append(IndexEntry(*key, "UNAVAILABLE", "not loaded: outside the "
                                      f"{settings(key[0]).version_policy()}"))
        elif state.ready:
            entries.append(IndexEntry(*key, "READY", "removed from disk; served until the "
                                      "versions replacing it are ready" if state.removed else ""))
        elif state.error:
            entries.append(IndexEntry(*key, "UNAVAILABLE", state.error))
        else:
            entries.append(IndexEntry(*key, "LOADING"))
    return entries


class ModelRepository:
    def __init__(self, settings: ServerSettings, core: ov.Core | None = None):
        self.settings = settings
        self.core = core or ov.Core()
        self._table: dict[str, dict[int, VersionState]] = {}
        self._lock = threading.Lock()  # guards the table's structure only, never inference
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._unreadable: dict[str, str] = {}  # model folders scan could not read, warned about
        self._repository_unreadable = False  # warned about
        self._unexported: set[Path] = set()  # version folders of other model files, warned about
        self._missing_pins: dict[str, str] = {}  # model -> the warning last logged
        self._names_on_disk: list[str] = []  # model folders at the last scan, served or not
        self._settling: set[tuple[str, int]] = set()  # versions whose files are still written
        # (time.monotonic(), name, version, "ready" | "unloaded"): when each version could be
        # served; a ready time is taken just before, an unload time just after, the change.
        self.history: deque[tuple[float, str, int, str]] = deque(maxlen=10_000)
        # called (no lock held) after the table changed: a load ended, a scan added or dropped
        # versions; the server's per-model health follows it
        self.listeners: list[Callable[[], None]] = []
        # called when reloaded settings fail to compile for a version (it answers on with the
        # settings before): the server counts it as a failed reload
        self.on_settings_failed: Callable[[], None] = lambda: None

    # --- lifecycle ------------------------------------------------------------------------

    def check_devices(self, settings: ServerSettings | None = None) -> None:
        """Fail early, naming the devices present, when a configured device is missing."""
        settings = settings or self.settings
        present = self.core.available_devices
        wanted = {settings.defaults.device} | {m.device for m in settings.models.values()}
        for device in wanted:
            base = device.split(":")[0].split(".")[0]
            if base in ("AUTO", "HETERO", "MULTI"):
                continue
            if not any(d == device or d.split(".")[0] == base for d in present):
                raise ValueError(f"device {device!r} is not present; devices here: "
                                 f"{', '.join(present)} (or AUTO)")

    def start(self, wait: bool = True) -> None:
        # a version that fails to load hands its place to the one before it at the next
        # refresh; at start that refresh comes at once, so the server starts with a fallback
        for _ in range(64):
            started = self.refresh(wait=wait)
            if wait and self._settling:  # files still being written: serve them from the start
                time.sleep(SETTLE_SECONDS / 4)
                continue
            if not wait or not any(state.error for state in started):
                break
        self._watcher = threading.Thread(target=self._watch, name="repository-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.refresh(wait=False)
            except Exception:  # noqa: BLE001 - the watcher must survive a bad scan
                log.exception("repository scan failed")

    def refresh(self, wait: bool = False) -> list[VersionState]:
        """Bring the table in step with the disk; the versions whose load it started."""
        on_disk = self._scan()
        if on_disk is None:
            return []
        loaders, reloads = [], []
        with self._lock:
            self._names_on_disk = sorted(set(on_disk) | set(self._unreadable))
            self._settling = set()
            plans = {name: plan_versions(versions, self.settings.for_model(name),
                                         self._failed(name))
                     for name, versions in on_disk.items()}
            self._warn_about_missing_pins(on_disk)
            for name in list(self._table):
                if name not in self._unreadable:  # unreadable for now: left as it is
                    self._retire(name, on_disk.get(name, {}), *plans.get(name, ({}, {})))
            for name, (serve, _) in plans.items():
                for version, path in serve.items():
                    known = self._table.get(name, {}).get(version)
                    signature = files_signature(path)
                    changed = known is not None and known.ready and signature != known.files
                    if known is not None and not changed \
                            and not self._worth_retrying(known, signature):
                        continue
                    if not quiet(signature):  # a copy still writing: load it once it is done
                        self._settling.add((name, version))
                        continue
                    if changed:  # rewritten in place: compiled again, the old copy answers
                        log.warning("%s version %d: its files changed on disk while it "
                                    "serves; loading them again", name, version)
                        known.files = signature  # one reload per change, whatever it gives
                        reloads.append((known, signature))
                        continue
                    if known is not None:
                        log.info("loading %s version %d again: its files or settings "
                                 "changed", name, version)
                    state = VersionState(name, version, path, files=signature)
                    self._table.setdefault(name, {})[version] = state
                    loaders.append(state)
        for state, signature in reloads:
            threading.Thread(target=self._recompile, args=(state, signature), daemon=True).start()
        threads = [threading.Thread(target=self._load, args=(state,), daemon=True)
                   for state in loaders]
        for thread in threads:
            thread.start()
        self._changed()
        if wait:
            for thread in threads:
                thread.join()
        return loaders

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def _scan(self) -> dict[str, dict[int, Path]] | None:
        """scan(), warning once per spell of each folder that cannot be read; None while the
        repository itself cannot be: unloading everything on a volume's hiccup would turn it
        into an outage."""
        repository = Path(self.settings.repository)
        try:
            on_disk, unreadable, unexported = scan(repository)
        except RepositoryUnreadable as exc:
            if not self._repository_unreadable:
                self._repository_unreadable = True
                log.warning("cannot read the repository %s (%s); the loaded versions keep "
                            "serving until it is back", repository, exc.strerror)
            return None
        if self._repository_unreadable:
            self._repository_unreadable = False
            log.info("the repository %s can be read again", repository)
        for name in unreadable.keys() - self._unreadable.keys():
            log.warning("cannot read %s (%s); its loaded versions keep serving until it can be",
                        repository / name, unreadable[name])
        for name in self._unreadable.keys() - unreadable.keys():
            log.info("%s can be read again", repository / name)
        self._unreadable = unreadable
        for version_dir in unexported.keys() - self._unexported:
            log.warning("%s", unexported[version_dir])
        self._unexported = set(unexported)
        return on_disk

    def _warn_about_missing_pins(self, on_disk: dict[str, dict[int, Path]]) -> None:
        """Once per model and state: pinned versions that are not on disk (a typo in a rollback
        must not pass unseen; what serves goes on serving)."""
        warnings = {name: missing_pins_warning(name, self.settings.for_model(name), versions)
                    for name, versions in on_disk.items()}
        for name, warning in warnings.items():
            if warning and self._missing_pins.get(name) != warning:
                log.warning("%s", warning)
        self._missing_pins = {name: warning for name, warning in warnings.items() if warning}

    def _failed(self, name: str) -> set[int]:
        """Versions of `name` that failed to load and whose files have not changed since."""
        return {v for v, state in self._table.get(name, {}).items()
                if state.error is not None
                and not self._worth_retrying(state, files_signature(state.path))}

    def _retire(self, name: str, on_disk: dict[int, Path], serve: dict[int, Path],
                listed: dict[int, Path]) -> None:
        """Unload the versions of `name` outside its plan (the lock held). They go only once
        every version to serve is ready, so unversioned requests always find one: an older
        version outlives `latest_versions` and a removed one its directory (its weights are in
        memory) until the versions replacing it are compiled. A plan with nothing to serve
        while the model has versions on disk (every one failed, or the config pins versions
        that are not there) unloads nothing: what serves goes on, the index says why."""
        loaded = self._table[name]
        for version, state in list(loaded.items()):
            if state.removed and version in on_disk:  # its directory came back: new files
                self._unload(name, version, "its directory was put back; loading it anew")
            elif version not in on_disk:
                state.removed = True
        replaced = all(v in loaded and loaded[v].ready for v in serve) and (
            bool(serve) or not on_disk)
        for version, state in list(loaded.items()):
            if version in serve or version in listed or not replaced:
                continue
            self._unload(name, version, "removed from disk" if state.removed else
                         f"outside the {self.settings.for_model(name).version_policy()}")
        if not loaded:
            del self._table[name]

    def _unload(self, name: str, version: int, why: str) -> None:
        """Drop a version from the table (the lock held); requests holding it finish on it."""
        log.info("unloading %s version %d: %s", name, version, why)
        unloaded = self._table[name].pop(version)
        self.history.append((time.monotonic(), name, version, "unloaded"))
        if unloaded.model is not None:
            unloaded.model.close()

    def _worth_retrying(self, state: VersionState, signature: tuple) -> bool:
        """A failed version is loaded again once its files (`signature` now: a copy caught
        half-way) or its model's settings (a reloaded config) are not those it failed with."""
        return state.error is not None and (
            signature != state.files or state.settings != self.settings.for_model(state.name))

    def _compile(self, state: VersionState) -> ClassifierModel | None:
        """The version's IR compiled with its model's current settings (kept in `state`), or
        None with the reason in `state.error`."""
        settings = state.settings = self.settings.for_model(state.name)
        state.error = mismatch(state.path) or None  # a copy caught half-way is not compiled
        if state.error:
            return None
        try:
            model = ClassifierModel(state.path, settings.device, settings.compile_config(),
                                    self.core, settings.routes()).load()
        except Exception as exc:  # noqa: BLE001 - reported through ModelReady / ModelInfo
            state.error = error_reason(exc)
            return None
        for warning in model.warnings:
            log.warning("%s version %d: %s", state.name, state.version, warning)
        return model

    def _load(self, state: VersionState) -> None:
        model = self._compile(state)
        if model is None:
            log.error("failed to load %s version %d: %s", state.name, state.version, state.error)
            self._changed()
            return
        self.history.append((time.monotonic(), state.name, state.version, "ready"))
        state.model = model
        log.info("loaded %s version %d on %s", state.name, state.version, state.settings.device)
        self._changed()
        with self._lock:
            removed = self._table.get(state.name, {}).get(state.version) is not state
            stale = state.settings != self.settings.for_model(state.name)
        if removed:  # unloaded while it compiled
            state.model.close()
        elif stale:  # the settings were reloaded while it compiled
            self._recompile(state)

    # --- settings reloaded ------------------------------------------------------------------

    def apply_settings(self, settings: ServerSettings) -> list[str]:
        """Take reloaded per-model settings. A loaded version whose model's settings changed is
        compiled again with them and swapped in once ready, answering on the old ones
        meanwhile; one that failed to load is tried with them (`_worth_retrying`), and
        `latest_versions` takes effect, at the refresh this ends with. The names of the
        models recompiled."""
        with self._lock:
            self.settings = settings
            stale = [s for versions in self._table.values() for s in versions.values()
                     if s.ready and s.settings != settings.for_model(s.name)]
        for state in stale:
            threading.Thread(target=self._recompile, args=(state,), daemon=True).start()
        self.refresh()
        return sorted({s.name for s in stale})

    def _recompile(self, old: VersionState, files: tuple | None = None) -> None:
        """`old` compiled again, with the model's current settings, or from its changed
        `files`, and swapped in once ready; on failure the old copy answers on."""
        fresh = VersionState(old.name, old.version, old.path, statistics=old.statistics,
                             files=files or old.files)
        fresh.model = self._compile(fresh)
        if fresh.model is None:
            if not files:
                self.on_settings_failed()  # counted before it is said, for who reads the log
            log.error("%s version %d keeps serving as loaded before: compiling %s failed: %s",
                      old.name, old.version, "its changed files" if files else
                      "it with the reloaded settings", fresh.error)
            return
        with self._lock:
            current = self._table.get(old.name, {}).get(old.version) is old
            if current:
                self._table[old.name][old.version] = fresh
            # reloaded again while it compiled (a second recompile of `old` is dropped below)
            stale = current and fresh.settings != self.settings.for_model(old.name)
        (old if current else fresh).model.close()
        if current:
            log.info("%s version %d now runs %s (%s)", old.name, old.version,
                     "its changed files" if files else "with the reloaded settings",
                     fresh.settings.device)
        if stale:
            self._recompile(fresh)

    # --- lookups --------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._table)

    def names_on_disk(self) -> list[str]:
        """The model folders of the last scan, with versions served or not (a pin that
        matches none of them serves nothing, yet the folder is there)."""
        with self._lock:
            return list(self._names_on_disk)

    def serves(self, name: str) -> bool:
        """Whether `name` is in the table (per request: no list built, no sort)."""
        with self._lock:
            return name in self._table

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._table.get(name, {}))

    def state(self, name: str, version: str | int | None = None) -> VersionState:
        """The requested version, or the newest ready one (the newest at all if none is)."""
        with self._lock:
            versions = dict(self._table.get(name, {}))
        if not versions:
            served = ", ".join(self.names()) or "none"
            raise NotServed(f"model_name {shown(name)} is not served (served: {served})")
        if version not in (None, "", 0, "0"):
            number = version if isinstance(version, int) else version_number(version)
            if number is None:
                raise NotServed(f"model_version {shown(version)} is not a version number "
                                "(digits, or empty for the newest)")
            if number not in versions:
                raise NotServed(f"model_version {shown(number)} of {name!r} is not served "
                                f"(versions: {sorted(versions)})")
            return versions[number]
        ready = [v for v in sorted(versions) if versions[v].ready]
        return versions[ready[-1] if ready else max(versions)]

    def states(self, name: str = "") -> list[VersionState]:
        """Every listed version of `name` (of every model when empty), by name and version."""
        if name:
            self.state(name)  # NotServed, listing what is, for an unknown name
        with self._lock:
            return [self._table[n][v] for n in sorted(self._table) if not name or n == name
                    for v in sorted(self._table[n])]

    def index(self) -> list[IndexEntry]:
        """Every version on disk or loaded, with its state (the repository as it is now: a
        folder that cannot be read lists what is loaded)."""
        try:
            on_disk = scan(Path(self.settings.repository)).found
        except RepositoryUnreadable:
            on_disk = {}
        return index_entries(on_disk, self.states(), self.settings.for_model)

    def load_now(self, name: str, timeout: float) -> list[VersionState]:
        """Scan now instead of at the next poll, and wait (up to `timeout` seconds) until
        `name`'s versions have loaded or failed: a pipeline that has just exported a version
        learns when it serves. Its listed versions; NotServed when none is on disk."""
        self.refresh(wait=True)
        end = time.monotonic() + timeout
        while any(not s.ready and not s.error for s in self.states(name)) \
                and time.monotonic() < end:
            time.sleep(0.05)
        return self.states(name)

    def holding_back_readiness(self) -> list[str]:
        """The models that keep the server from being ready: the unserved ones, unless the
        settings' strict_readiness is off (multi-model pods: a broken model must not take the
        others out of their Service; per-model health still says which one is down)."""
        return self.unserved() if self.settings.strict_readiness else []

    def unserved(self) -> list[str]:
        """Models in the repository with no version ready and none loading (every version
        failed, a pin that matches none, a folder that cannot be read): while there is one,
        the server is not ready. A model still loading its first version does not count: a
        model added to a running fleet must not take every server out of its Service."""
        with self._lock:
            names = set(self._names_on_disk) | set(self._table)
            settling = {name for name, _ in self._settling}
            return sorted(name for name in names - settling
                          if not any(s.ready or not s.error
                                     for s in self._table.get(name, {}).values()))
