"""Log set-up for `xaiserve serve`: readable text, or one JSON object per line for collectors.

Lines logged while a request is handled carry its request id, model and method even when the
code that logs them knows nothing of the request (the request context fills them in), and the
client's trace id and span id when it sent a W3C `traceparent` (OpenTelemetry's gRPC
instrumentation does), so that a tracing backend's span leads to the server's lines."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from datetime import datetime, timezone

from . import request_context

FORMATS = ("text", "json")
REQUEST_FIELDS = ("request_id", "model", "version", "method", "code", "ms", "trace_id",
                  "span_id", "token_id", "protocol")
# the fields a request's record holds, copied onto lines logged while it is handled
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(request_context.RequestRecord)
                      if field.name in REQUEST_FIELDS)


class RequestFields(logging.Filter):
    """Copy the current request's fields (id, model, method, trace, token id, protocol) onto
    records that lack them."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_context.current()
        if current is not None:
            for name in RECORD_FIELDS:
                if not hasattr(record, name):
                    setattr(record, name, getattr(current, name))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{n}={getattr(record, n)}" for n in REQUEST_FIELDS
                         if getattr(record, n, None) not in (None, "") and n != "method")
        return f"{text} [{extra}]" if extra else text


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Root logging to stderr in `fmt` ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format {fmt!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
