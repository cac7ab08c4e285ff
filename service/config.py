"""Server settings: defaults, per-model overrides from a YAML file, and flags."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .model import RISE_BATCH, Routes
from .rise import MAX_BATCH_SIZE as MAX_BLACK_BOX_BATCH

HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISIONS = ("default", "f32", "bf16", "f16")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSettings:
    """How one model is compiled and what its black-box explanations may cost."""

    device: str = "CPU"
    performance_hint: str = "THROUGHPUT"
    num_requests: int = 0  # 0: the compiled model's optimal number
    # Arithmetic of the layers that are not INT8. "default" is the device's choice: bf16 on CPUs
    # with AMX, where it changed 5 to 7% of the default model's top-1 classes on photo crops,
    # and f32 keeps them at 1.2 to 1.5 times the latency (README, "On an Intel Xeon with AMX").
    inference_precision: str = "default"
    black_box_masks: int = 1000  # default RISE masks per request
    max_black_box_masks: int = 8000  # per-request cap
    # Masked images per inference of RISE's copy (service.rise_graph): 8 was fastest on 2 vCPUs
    # of an AMX Xeon (1.41 s per 1000 masks; 1.60 at 1, 1.50 at 16).
    black_box_batch: int = RISE_BATCH
    # Extra compiled copies (service.model.Routes): predictions without the saliency branch,
    # single images on an idle model through a LATENCY-compiled copy, and single images on
    # copies with the batch fixed at 1, which infer 7% faster on CPU.
    scores_only_copy: bool = True
    latency_copy_when_idle: bool = True
    single_image_copies: bool = True
    # Requests waiting for a busy model run as one batch of up to this many images (0: off).
    # Off by default: on this 2-core CPU batch 8 infers fewer images per second than batch 1
    # (benchmark_app 107 against 114 FPS) and measured 0.87-0.92 of unbatched in-process.
    batch_when_busy: int = 0
    # Images one ModelInfer request may carry (ModelConfig's max_batch_size): bounds the memory
    # a request takes (its outputs grow with it: 196 KB of saliency maps per image on Lite0).
    max_batch_size: int = 32

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


@dataclass(frozen=True)
class ServerSettings:
    repository: Path = Path("models")
    host: str = "0.0.0.0"
    port: int = 9000
    workers: int = 16
    max_message_bytes: int = 32 * 1024 * 1024
    poll_seconds: float = 2.0
    max_black_box_in_flight: int = 2  # server-wide cap on concurrent black-box explanations
    max_concurrent_requests: int = 32  # beyond it a request gets RESOURCE_EXHAUSTED at once
    shutdown_grace: float = 10.0  # seconds in-flight requests get after SIGTERM
    metrics_port: int | None = None  # Prometheus text over HTTP; None: off, 0: any free port
    tls_cert: Path | None = None  # PEM server certificate (chain); with tls_key: TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle; set: clients must present a certificate
    token_file: Path | None = None  # a file holding the bearer token (or env XAISERVE_TOKEN)
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def for_model(self, name: str) -> ModelSettings:
        return self.models.get(name, self.defaults)


def _model_settings(raw: dict, base: ModelSettings, where: str) -> ModelSettings:
    known = {f.name for f in fields(ModelSettings)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    settings = replace(base, **raw)
    if settings.performance_hint not in HINTS:
        raise ConfigError(f"{where}.performance_hint: {settings.performance_hint!r}; one of {HINTS}")
    if settings.inference_precision not in PRECISIONS:
        raise ConfigError(f"{where}.inference_precision: {settings.inference_precision!r}; one "
                          f"of {PRECISIONS}")
    if settings.max_batch_size < 1:
        raise ConfigError(f"{where}.max_batch_size: {settings.max_batch_size}; must be at least 1")
    batch = settings.black_box_batch
    if isinstance(batch, bool) or not isinstance(batch, int) or not (
            1 <= batch <= MAX_BLACK_BOX_BATCH):
        raise ConfigError(f"{where}.black_box_batch: {batch!r}; must be an integer in "
                          f"[1, {MAX_BLACK_BOX_BATCH}]")
    if settings.max_black_box_masks < settings.black_box_masks:
        raise ConfigError(f"{where}: black_box_masks is over max_black_box_masks")
    return settings


def load_settings(config_file: Path | None, **flags) -> ServerSettings:
    """The YAML file (`defaults:` and `models: {name: {...}}`), then flags that are not None."""
    raw: dict = {}
    if config_file is not None:
        try:
            raw = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--config {config_file}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:  # its message spans lines: the problem and where it is
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--config {config_file}: not valid YAML{where}: {problem}") \
                from None
    model_flags = {k: v for k, v in flags.items()
                   if k in {f.name for f in fields(ModelSettings)} and v is not None}
    defaults = _model_settings({**raw.get("defaults", {}), **model_flags}, ModelSettings(),
                               "defaults")
    models = {name: _model_settings(values or {}, defaults, f"models.{name}")
              for name, values in (raw.get("models") or {}).items()}
    server_keys = {f.name for f in fields(ServerSettings)} - {"defaults", "models"}
    server = {k: v for k, v in raw.get("server", {}).items() if k in server_keys}
    server.update({k: v for k, v in flags.items() if k in server_keys and v is not None})
    for key in PATH_KEYS:
        if server.get(key) is not None:
            server[key] = Path(server[key])
    settings = ServerSettings(defaults=defaults, models=models, **server)
    check_server(settings)
    return settings


PATH_KEYS = ("repository", "tls_cert", "tls_key", "tls_client_ca", "token_file")


def check_server(settings: ServerSettings) -> None:
    """Settings that cannot work together fail at start, naming the flag to give."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
    for key in ("max_concurrent_requests", "workers", "max_message_bytes",
                "max_black_box_in_flight"):
        if int(getattr(settings, key)) < 1:
            raise ConfigError(f"{key} {getattr(settings, key)}: must be at least 1")
    if not 0 <= settings.shutdown_grace <= 3600:  # NaN fails too; inf cannot be waited for
        raise ConfigError(f"shutdown_grace {settings.shutdown_grace}: must be 0 to 3600 "
                          "seconds")
    for key in ("port", "metrics_port"):  # 0: any free port
        value = getattr(settings, key)
        if value is not None and not 0 <= int(value) <= 65535:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: must be 0..65535 (0: any "
                              "free port)")
    if not 0 < settings.poll_seconds <= 86400:  # 0: a busy loop; inf: no watcher at all
        raise ConfigError(f"--poll-seconds {settings.poll_seconds}: must be over 0 and at "
                          "most 86400")
    if not Path(settings.repository).is_dir():
        raise ConfigError(f"--repository {settings.repository}: no such folder; give the "
                          "folder that holds <name>/<version>/model.xml")
