"""Triton's system shared memory extension: a client on the same host (a camera process beside
the server on an edge box) writes its frames into a POSIX shared memory object, registers it
once as a named region, and names the region in each request instead of sending the tensor;
outputs can be written back the same way. The frame then never goes through the socket.

Off unless the server starts with `--shared-memory system`: registering a key lets the caller
read and write that object with the server's rights, so it is for callers on the same host the
server trusts (Triton's model too). Objects are read and written with pread and pwrite on a
descriptor rather than mapped: a client that shrinks its object gets an error, where a mapping
would kill the server with SIGBUS.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import RequestError, exhausted, invalid, shown

SHM_ROOT = Path("/dev/shm")  # where Linux keeps shm_open's objects
MAX_REGIONS = 256
# the parameters of an input, or of a requested output, that place it in a region
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
TURN_ON = ("system shared memory is off on this server: start it with --shared-memory system "
           "(for clients on the same host), or send the tensor in the request")


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int  # where the region starts in the object
    byte_size: int


@dataclass(frozen=True)
class TensorPlace:
    """Where a request's tensor lies: a region, an offset in it, a size in bytes."""

    region: str
    offset: int
    byte_size: int


def _parameter(parameters, key: str, where: str, kind: type):
    value = parameters[key]
    value = getattr(value, value.WhichOneof("parameter_choice") or "string_param")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise invalid(f"{where}.parameters.{key} {shown(value)}: a number of bytes (int64)")
    if kind is str and (not isinstance(value, str) or not value):
        raise invalid(f"{where}.parameters.{key} {shown(value)}: the name of a registered "
                      "region (string)")
    return value


def tensor_place(parameters, where: str) -> TensorPlace | None:
    """The shared_memory_* parameters of an input or a requested output; None without them."""
    if REGION not in parameters:
        for key in (OFFSET, BYTE_SIZE):
            if key in parameters:
                raise invalid(f"{where}.parameters.{key} without {REGION}: name the region too")
        return None
    if BYTE_SIZE not in parameters:
        raise invalid(f"{where}.parameters.{BYTE_SIZE}: missing; give the tensor's size in "
                      "bytes with its region")
    return TensorPlace(_parameter(parameters, REGION, where, str),
                       _parameter(parameters, OFFSET, where, int) if OFFSET in parameters else 0,
                       _parameter(parameters, BYTE_SIZE, where, int))


def write_all(descriptor: int, data, offset: int) -> None:
    """pwrite until every byte is written (one call may write fewer)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written


def object_path(key: str, root: Path = SHM_ROOT) -> Path:
    """shm_open's name ("/frames" or "frames") as its file; nothing outside the root."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name or len(name) > 255:
        raise invalid(f"key {shown(key)}: the name of a POSIX shared memory object, as given "
                      "to shm_open (\"/frames\"), with no other slash")
    return root / name


class _Region:
    def __init__(self, status: RegionStatus, descriptor: int):
        self.status = status
        self.descriptor = descriptor

    def span(self, place: TensorPlace, where: str) -> int:
        """The object offset of the tensor, once it is known to lie inside the region."""
        if place.offset + place.byte_size > self.status.byte_size:
            raise invalid(f"{where}: {place.byte_size} bytes at offset {place.offset} run past "
                          f"region {place.region!r} ({self.status.byte_size} bytes); give an "
                          "offset and size inside it")
        return self.status.offset + place.offset

    def object_size(self) -> int:
        return os.fstat(self.descriptor).st_size

    def shrunk(self, where: str) -> Exception:
        return invalid(f"{where}: region {self.status.name!r} ends early: its object "
                       f"{self.status.key!r} was shrunk after it was registered; register it "
                       "again")


class SharedMemoryRegions:
    """The registered regions, by name; every read, write and change holds one lock, so a
    region is never closed while a request reads it (a copy of a frame takes microseconds).
    A read is bounded as a message is (`max_read_bytes`): a client's region may be any size."""

    def __init__(self, enabled: bool, max_read_bytes: int = 32 * 1024 * 1024,
                 root: Path = SHM_ROOT):
        self.enabled = enabled
        self.max_read_bytes = max_read_bytes
        self.root = root
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, TURN_ON)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise invalid("name: empty; name the region (requests refer to it by name)")
        if byte_size == 0:
            raise invalid("byte_size 0: give the region's size in bytes")
        path = object_path(key, self.root)
        with self._lock:
            if name in self._regions:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"name {shown(name)}: a region of that name is registered; "
                                   "unregister it first or choose another name")
            if len(self._regions) >= MAX_REGIONS:
                raise exhausted(f"{MAX_REGIONS} regions are registered, this server's most; "
                                "unregister some first")
            descriptor = self._open(path, key)
            try:
                size = os.fstat(descriptor).st_size
                if offset + byte_size > size:
                    raise invalid(f"offset {offset} + byte_size {byte_size}: past the end of "
                                  f"{key!r} ({size} bytes); register a region inside it")
            except BaseException:
                os.close(descriptor)
                raise
            self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size),
                                          descriptor)

    @staticmethod
    def _open(path: Path, key: str) -> int:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise invalid(f"key {shown(key)}: no shared memory object of that name on the "
                          f"server's host ({path}); create it (shm_open) first, on this host "
                          "(a container shares it with --ipc=host)") from None
        except OSError as exc:
            raise invalid(f"key {shown(key)}: {path} cannot be opened for reading and writing "
                          f"by the server ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise invalid(f"key {shown(key)}: {path} is not a shared memory object")
        return descriptor

    def unregister(self, name: str) -> None:
        """One region, or every region for an empty name; a name not registered is no error
        (as Triton's: a client cleaning up may not know what was left)."""
        self._check_enabled()
        with self._lock:
            names = [name] if name else list(self._regions)
            for each in names:
                region = self._regions.pop(each, None)
                if region is not None:
                    os.close(region.descriptor)

    def status(self, name: str) -> list[RegionStatus]:
        self._check_enabled()
        with self._lock:
            if name and name not in self._regions:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"name {shown(name)}: no region of that name is registered "
                                   f"({len(self._regions)} are)")
            return [r.status for n, r in self._regions.items() if not name or n == name]

    def totals(self) -> tuple[int, int]:
        """How many regions are registered, and the bytes they span (for metrics; on or off)."""
        with self._lock:
            return (len(self._regions),
                    sum(r.status.byte_size for r in self._regions.values()))

    def _region(self, place: TensorPlace, where: str) -> _Region:
        self._check_enabled()
        region = self._regions.get(place.region)
        if region is None:
            raise invalid(f"{where}: region {shown(place.region)} is not registered; register "
                          "it first (SystemSharedMemoryRegister)")
        return region

    def check(self, place: TensorPlace, where: str) -> None:
        """Refuse a place that does not exist before the work that would write to it."""
        with self._lock:
            self._region(place, where).span(place, where)

    def read(self, place: TensorPlace, where: str) -> bytes:
        self._check_enabled()
        if place.byte_size > self.max_read_bytes:
            raise exhausted(f"{where}: {place.byte_size} bytes, over the server's "
                            f"max_message_bytes ({self.max_read_bytes}); send less")
        with self._lock:
            region = self._region(place, where)
            data = os.pread(region.descriptor, place.byte_size, region.span(place, where))
        if len(data) < place.byte_size:
            raise region.shrunk(where)
        return data

    def write(self, place: TensorPlace, data: bytes, where: str) -> None:
        if len(data) > place.byte_size:
            raise invalid(f"{where}: the output takes {len(data)} bytes, more than the "
                          f"{place.byte_size} given for it in region {place.region!r}; give "
                          "at least that")
        with self._lock:
            region = self._region(place, where)
            start = region.span(place, where)
            if start + len(data) > region.object_size():  # never grow a client's object
                raise region.shrunk(where)
            write_all(region.descriptor, data, start)

    def close(self) -> None:
        with self._lock:
            for region in self._regions.values():
                os.close(region.descriptor)
            self._regions.clear()
