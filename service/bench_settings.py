"""What a `xaiserve bench` run does, checked before any work: each bad option fails in one
line naming it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import bench_works as works
from .config import HINTS, PRECISIONS
from .rest_client import rest_address
from .security import ServerAccess


class BenchError(ValueError):
    """Bad settings or an unusable target; the message names the option and the fix."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything a bench run does. `model_paths` are version directories (or model.xml)."""

    model_paths: tuple[Path, ...] = ()
    server: str | None = None
    streaming: bool = False  # with --server (gRPC): each client's requests over one stream
    access: ServerAccess = ServerAccess()  # with --server: TLS files and token
    token_file: Path | None = None  # where access.token came from, for the record only
    model: str | None = None
    version: str = ""
    works: tuple[str, ...] = ("predict", "explain-white")
    batch_sizes: tuple[int, ...] = (1,)
    concurrency: tuple[int, ...] = (1,)
    devices: tuple[str, ...] = ("CPU",)
    precisions: tuple[str, ...] = ("default",)
    hints: tuple[str, ...] = ("THROUGHPUT",)
    streams: tuple[str, ...] = ("auto",)
    warmup_s: float = 2.0
    window_s: float = 3.0
    window_count: int = 0  # > 0: windows of this many requests instead of window_s
    stability: float = 0.10
    stable_windows: int = 3
    max_windows: int = 10
    masks: int = 500
    seed: int = 0
    image: Path | None = None
    reference: bool = True
    reference_seconds: int = 10
    layers: bool = False  # per-layer counters of each in-process configuration and batch
    layer_iterations: int = 100

    @property
    def give_up_s(self) -> float:
        """How long a point's requests may all fail, after some succeeded, before the point is
        given up (a server that died mid-run): long enough for a restart, short enough that a
        run never hangs."""
        return max(10.0, 3 * self.window_s)

    def record(self) -> dict:
        """The settings as bench.json keeps them. The token is a secret and bench.json a file
        people share: it says only whether one was given, and from which file."""
        data = asdict(self)
        data["access"] = {"tls_ca": self.access.tls_ca, "tls_cert": self.access.tls_cert,
                          "tls_key": self.access.tls_key,
                          "token_given": self.access.token is not None,
                          "token_file": self.token_file}
        del data["token_file"]
        return data

    def validate(self) -> "BenchSettings":
        if not self.model_paths and not self.server:
            raise BenchError("give --model-path (in-process) or --server HOST:PORT --model NAME")
        if self.server and not self.model:
            raise BenchError("--model NAME is needed with --server")
        if self.server and "://" in self.server and not rest_address(self.server):
            raise BenchError(f"--server {self.server}: give HOST:PORT (gRPC) or "
                             "http[s]://HOST:PORT (the REST side, `serve --rest-port`)")
        if self.server and self.server.startswith("http://") and self.access.tls:
            raise BenchError(f"--server {self.server} with --tls-ca/--tls-cert: give "
                             f"https://{self.server[len('http://'):]} for the REST side over TLS")
        if self.streaming and (not self.server or "://" in self.server):
            raise BenchError("--streaming sends each client's requests over a gRPC stream: give "
                             "--server HOST:PORT (the REST side has no streams)")
        if self.layers and not self.model_paths:
            raise BenchError("--layers reads the IR's per-layer counters in-process: give "
                             "--model-path (with --server: the IR the server serves)")
        for path in self.model_paths:
            xml = path if path.suffix == ".xml" else path / "model.xml"
            if not xml.is_file():
                raise BenchError(f"--model-path {path}: no model.xml there")
        unknown = [w for w in self.works if w not in works.WORKS]
        if unknown or not self.works:
            raise BenchError(f"--works {','.join(unknown) or '(none)'}: choose from "
                             f"{','.join(works.WORKS)}")
        for option, values in (("--batch", self.batch_sizes), ("--concurrency", self.concurrency)):
            if not values or any(v < 1 for v in values):
                raise BenchError(f"{option} {list(values)}: give positive integers, e.g. 1,4,8")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise BenchError(f"--precision {','.join(bad)}: choose from {','.join(PRECISIONS)}")
        bad = [h for h in self.hints if h not in HINTS]
        if bad:
            raise BenchError(f"--hint {','.join(bad)}: choose from {','.join(HINTS)}")
        bad = [s for s in self.streams if s != "auto" and not (s.isdigit() and int(s) > 0)]
        if bad:
            raise BenchError(f"--streams {','.join(bad)}: 'auto' or positive integers")
        day = 86400.0  # inf would never end
        checks = (("--warmup", self.warmup_s, 0 <= self.warmup_s <= day, "0 to 86400 seconds"),
                  ("--window", self.window_s, 0 < self.window_s <= day,
                   "more than 0 and at most 86400 seconds"),
                  ("--window-count", self.window_count, self.window_count >= 0,
                   "0 (windows of --window seconds) or more requests"),
                  ("--stability", 100 * self.stability, 0 < self.stability < 1,
                   "a percent above 0 and below 100, e.g. 10"),
                  ("--stable-windows", self.stable_windows, self.stable_windows >= 2,
                   "at least 2"),
                  ("--max-windows", self.max_windows, self.max_windows >= self.stable_windows,
                   f"at least --stable-windows ({self.stable_windows})"),
                  ("--masks", self.masks, self.masks >= 1, "at least 1"),
                  ("--reference-seconds", self.reference_seconds, self.reference_seconds >= 1,
                   "at least 1"),
                  ("--layer-iterations", self.layer_iterations, self.layer_iterations >= 1,
                   "at least 1"))
        for option, value, ok, rule in checks:
            if not ok:
                raise BenchError(f"{option} {value:g}: give {rule}")
        if self.image is not None and not self.image.exists():
            raise BenchError(f"--image {self.image}: no such file")
        return self
