"""Server settings: defaults, per-model overrides from a YAML file, and flags.

Both settings classes are pydantic dataclasses: every field is checked for its type and range
where it is declared, so a value from the YAML file or a flag that cannot work ("many" masks,
a port of 99999, "no" for a switch, a negative cap) fails at start with one line naming the key
or the flag, instead of a traceback or a server that quietly does something else.
"""

from __future__ import annotations

from dataclasses import field, fields, replace
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from .model import RISE_BATCH, Routes
from .rise import MAX_BATCH_SIZE as MAX_BLACK_BOX_BATCH

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISIONS = ("default", "f32", "bf16", "f16")
# Strict: YAML's "no" or "5" in quotes are strings, not a switch or a number; paths alone may
# be given as text. No infinities: an infinite grace or poll period cannot be waited for. No
# unknown fields: built in Python (tests, embedding programs) a misspelt setting was dropped.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
PORT = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port
POSITIVE = Annotated[int, Field(ge=1)]
A_PATH = Annotated[Path, Field(strict=False)]
MAYBE_PATH = Annotated[Path | None, Field(strict=False)]


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, config=STRICT)
class ModelSettings:
    """How one model is compiled and what its black-box explanations may cost."""

    device: Annotated[str, Field(min_length=1)] = "CPU"
    performance_hint: Literal[HINTS] = "THROUGHPUT"
    num_requests: Annotated[int, Field(ge=0)] = 0  # 0: the compiled model's optimal number
    # Arithmetic of the layers that are not INT8. "default" is the device's choice: bf16 on CPUs
    # with AMX, where it changed 5 to 7% of the default model's top-1 classes on photo crops,
    # and f32 keeps them at 1.2 to 1.5 times the latency (README, "On an Intel Xeon with AMX").
    inference_precision: Literal[PRECISIONS] = "default"
    black_box_masks: POSITIVE = 1000  # default RISE masks per request
    max_black_box_masks: POSITIVE = 8000  # per-request cap
    # Masked images per inference of RISE's copy (service.rise_graph): 8 was fastest on 2 vCPUs
    # of an AMX Xeon (1.41 s per 1000 masks; 1.60 at 1, 1.50 at 16).
    black_box_batch: Annotated[int, Field(ge=1, le=MAX_BLACK_BOX_BATCH)] = RISE_BATCH
    # Extra compiled copies (service.model.Routes): predictions without the saliency branch,
    # single images on an idle model through a LATENCY-compiled copy, and single images on
    # copies with the batch fixed at 1, which infer 7% faster on CPU.
    scores_only_copy: bool = True
    latency_copy_when_idle: bool = True
    single_image_copies: bool = True
    # Requests waiting for a busy model run as one batch of up to this many images (0: off).
    # Off by default: on this 2-core CPU batch 8 infers fewer images per second than batch 1
    # (benchmark_app 107 against 114 FPS) and measured 0.87-0.92 of unbatched in-process.
    batch_when_busy: Annotated[int, Field(ge=0)] = 0
    # Images one ModelInfer request may carry (ModelConfig's max_batch_size): bounds the memory
    # a request takes (its outputs grow with it: 196 KB of saliency maps per image on Lite0).
    max_batch_size: POSITIVE = 32
    # Requests of this model in flight at once (0: only the server's max_concurrent_requests):
    # beyond it RESOURCE_EXHAUSTED, so one model's flood leaves slots to the others.
    max_requests_in_flight: Annotated[int, Field(ge=0)] = 0
    # Answers of this model kept in the server's response cache (when it has one:
    # response_cache_bytes > 0) and given again for the same request (service.response_cache)
    response_cache: bool = True
    # How many of the model's newest versions are loaded (OVMS's and Triton's version policy
    # "latest", which defaults to 1 there); 0: every version on disk, as before. Each loaded
    # version is up to six compiled copies, so a repository that keeps every daily export
    # wants a bound.
    latest_versions: Annotated[int, Field(ge=0)] = 0
    # Triton's version policy "specific": serve exactly these versions (those on disk), newest
    # first for requests without a version; over latest_versions. A rollback without deleting
    # the newer export: pin the version before, and reload the config.
    versions: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, strict=False)
                        ] | None = None

    def version_policy(self) -> str:
        """What chooses the served versions, for messages."""
        return (f"versions {list(self.versions)} pinned by the config" if self.versions
                else f"latest_versions {self.latest_versions}")

    def compile_config(self) -> dict:
        config = {"PERFORMANCE_HINT": self.performance_hint}
        if self.num_requests:
            config["PERFORMANCE_HINT_NUM_REQUESTS"] = str(self.num_requests)
        if self.inference_precision != "default":
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return config

    def routes(self) -> Routes:
        return Routes(scores_only=self.scores_only_copy,
                      latency_when_idle=self.latency_copy_when_idle,
                      batch_when_busy=self.batch_when_busy,
                      single_image_copies=self.single_image_copies,
                      black_box_batch=self.black_box_batch)


@dataclass(frozen=True, config=STRICT)
class ServerSettings:
    repository: A_PATH = Path("models")
    host: Annotated[str, Field(min_length=1)] = "0.0.0.0"
    port: PORT = 9000
    workers: POSITIVE = 16
    # gRPC takes a signed 32-bit size
    max_message_bytes: Annotated[int, Field(ge=1, le=2**31 - 1)] = 32 * 1024 * 1024
    # over 0 (0 would be a busy loop), at most a day
    poll_seconds: Annotated[float, Field(gt=0, le=86400)] = 2.0
    max_black_box_in_flight: POSITIVE = 2  # server-wide cap on concurrent black-box explanations
    max_concurrent_requests: POSITIVE = 32  # beyond it a request gets RESOURCE_EXHAUSTED at once
    # request streams open at once (ModelStreamInfer, ExplainStream: a camera's frames); each
    # holds a gRPC thread of its own while it is open, on top of the threads unary calls get
    max_open_streams: Annotated[int, Field(ge=1, le=1024)] = 16
    # True: the server is ready (ServerReady, /v2/health/ready, health "") only while every
    # model in the repository serves a version, so a pod that cannot answer for one leaves its
    # Service; False: ready while it takes requests, as Triton's --strict-readiness false, for
    # pods of many models where one broken export must not take the others out (per-model
    # health and ModelReady still say which model is down)
    strict_readiness: bool = True
    # Triton's system shared memory extension (service.shared_memory): "system" lets clients
    # on this host register POSIX shared memory objects and pass tensors through them; off by
    # default, since a registered key is read and written with the server's rights
    shared_memory: Literal["off", "system"] = "off"
    # seconds in-flight requests get after SIGTERM
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 10.0
    # > 0: a client connection is closed (GOAWAY, in-flight calls finish) after this long, so
    # clients connect again and spread over replicas added since (gRPC keeps one connection
    # to one pod otherwise); 0: never
    max_connection_age: Annotated[float, Field(ge=0, le=86400)] = 0.0
    # Keepalive. Clients' pings (edge devices keep a connection open through a NAT's idle
    # timeout with them) are accepted this often, with or without calls in flight; gRPC's
    # default (one ping in 2 hours on an idle connection, 5 minutes with calls) answers a
    # client pinging every 30 s with GOAWAY "too_many_pings" after three of them.
    min_client_ping_interval: Annotated[float, Field(gt=0, le=86400)] = 10.0
    # > 0: the server pings a connection idle this long and closes it when the ping is not
    # answered within keepalive_timeout, so devices that vanished (power cut, network gone)
    # do not hold connections for hours; 0: never (gRPC's 2 hours)
    keepalive_time: Annotated[float, Field(ge=0, le=86400)] = 60.0
    keepalive_timeout: Annotated[float, Field(gt=0, le=3600)] = 20.0
    # Responses over 16 KiB (saliency maps) compressed for clients that accept it, as Triton's
    # --grpc-infer-response-compression-level: gzip halves Lite0's maps (196 KB of floats per
    # image) for devices on metered links, at about 4 ms of CPU per image; none: as they are
    response_compression: Literal["none", "gzip", "deflate"] = "none"
    # Triton's response cache (service.response_cache): answers of ModelInfer and Explain kept
    # for the same request, least recently used out, within this many bytes; 0: off
    response_cache_bytes: Annotated[int, Field(ge=0, le=2**40)] = 0
    metrics_port: PORT | None = None  # Prometheus text over HTTP; None: off, 0: any free port
    # the Open Inference Protocol's REST side (service.rest); None: off, 0: any free port
    rest_port: PORT | None = None
    tls_cert: MAYBE_PATH = None  # PEM server certificate (chain); with tls_key: TLS
    tls_key: MAYBE_PATH = None
    tls_client_ca: MAYBE_PATH = None  # PEM CA bundle; set: clients must present a certificate
    token_file: MAYBE_PATH = None  # a file holding the bearer token (or env XAISERVE_TOKEN)
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def for_model(self, name: str) -> ModelSettings:
        return self.models.get(name, self.defaults)


def unmatched_model_names(settings: ServerSettings, names: list[str]) -> list[str]:
    """A warning per `models:` entry that no model folder has (a typo: `efficientnet_lite`):
    not an error, since the model may arrive later, but its settings do not apply to the
    model meant."""
    return [f"the config sets models.{name}, but the repository has no model of that name "
            f"(it has: {', '.join(names) or 'none'}); its settings apply once a folder "
            f"{name}/ appears" for name in sorted(set(settings.models) - set(names))]


def _invalid(exc: ValidationError, where: str, flags: dict) -> ConfigError:
    """The first problem pydantic found, in one line naming the flag that gave the value, or
    else the file's key (`defaults.black_box_masks: 'many'; input should be ...`)."""
    problem = exc.errors()[0]
    key = ".".join(str(part) for part in problem["loc"])
    message = problem["msg"][:1].lower() + problem["msg"][1:]
    if key in flags:
        return ConfigError(f"--{key.replace('_', '-')} {problem['input']!r:.80}: {message}")
    return ConfigError(f"{where}{key}: {problem['input']!r:.80}; {message}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping of keys to values expected, not "
                          f"{type(value).__name__} {value!r:.60}")
    return value


def _known_keys(raw: dict, cls, where: str, exclude: tuple[str, ...] = ()) -> None:
    known = {f.name for f in fields(cls)} - set(exclude)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(map(str, unknown))}; known: "
                          f"{sorted(known)}")


def _model_settings(raw, base: ModelSettings, where: str, flags: dict) -> ModelSettings:
    raw = _mapping(raw, where)
    _known_keys(raw, ModelSettings, where)
    try:
        settings = replace(base, **raw)
    except ValidationError as exc:
        raise _invalid(exc, f"{where}.", flags) from None
    if settings.max_black_box_masks < settings.black_box_masks:
        raise ConfigError(f"{where}: black_box_masks is over max_black_box_masks")
    return settings


def load_settings(config_file: Path | None, **flags) -> ServerSettings:
    """The YAML file (`defaults:`, `models: {name: {...}}`, `server:`), then flags that are not
    None."""
    raw: dict = {}
    if config_file is not None:
        try:
            raw = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"--config {config_file}: cannot read it ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config {config_file}: not UTF-8 text") from None
        except yaml.YAMLError as exc:  # its message spans lines: the problem and where it is
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--config {config_file}: not valid YAML{where}: {problem}") \
                from None
        raw = _mapping(raw, f"--config {config_file}")
        unknown = set(raw) - {"defaults", "models", "server"}
        if unknown:
            raise ConfigError(f"--config {config_file}: unknown sections "
                              f"{sorted(map(str, unknown))}; known: defaults, models, server")
    flags = {k: v for k, v in flags.items() if v is not None}
    model_keys = {f.name for f in fields(ModelSettings)}
    model_flags = {k: v for k, v in flags.items() if k in model_keys}
    defaults = _model_settings({**_mapping(raw.get("defaults"), "defaults"), **model_flags},
                               ModelSettings(), "defaults", model_flags)
    models = {str(name): _model_settings(values, defaults, f"models.{name}", {})
              for name, values in _mapping(raw.get("models"), "models").items()}
    server = _mapping(raw.get("server"), "server")
    _known_keys(server, ServerSettings, "server", exclude=("defaults", "models"))
    server_flags = {k: v for k, v in flags.items() if k not in model_keys}
    try:
        settings = ServerSettings(defaults=defaults, models=models,
                                  **{**server, **server_flags})
    except ValidationError as exc:
        raise _invalid(exc, "server.", server_flags) from None
    check_server(settings)
    return settings


def check_server(settings: ServerSettings) -> None:
    """Settings that cannot work together fail at start, naming the flag to give."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
    ports = {"--port": settings.port, "--rest-port": settings.rest_port,
             "--metrics-port": settings.metrics_port}
    taken = [flag for flag, port in ports.items() if port and list(ports.values()).count(port) > 1]
    if taken:
        raise ConfigError(f"{' and '.join(taken)} are the same port {ports[taken[0]]}: give each "
                          "its own")
    if not Path(settings.repository).is_dir():
        raise ConfigError(f"--repository {settings.repository}: no such folder; give the "
                          "folder that holds <name>/<version>/model.xml")
