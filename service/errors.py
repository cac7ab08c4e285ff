"""Request errors carry the gRPC status and a message naming the field and the fix."""

from __future__ import annotations

import functools
import logging

import grpc

log = logging.getLogger("xaiserve.server")
# A status message travels in the response's metadata, which clients cap (16 KiB in gRPC):
# longer, it reaches them as another error. Ours are under 300 characters; a client's value
# echoed in one is cut by `shown`, and this bounds what a library message echoes.
MAX_STATUS_CHARS = 1000


class NotServed(LookupError):
    """Unknown model or version; the message lists what is served."""


def shown(value: object, limit: int = 80) -> str:
    """A client's value for a message: repr, cut so that a huge name cannot make the status
    outgrow the client's metadata limit (16 KiB in gRPC) and turn into another error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ends the message of a call refused because the server or a model is at its cap: the same call
# may succeed later (HTTP 429 over REST). Other RESOURCE_EXHAUSTED answers are over a size or
# count limit, and the same call never will (400).
RETRY_LATER = "; retry later"


def exhausted(message: str) -> RequestError:
    """Over a size or count limit: ask for less."""
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def busy(message: str) -> RequestError:
    """At a concurrency cap: retry later."""
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message + RETRY_LATER)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def client_gone(reason: str, work: str) -> RequestError:
    """The status of a call whose client stopped waiting ("cancelled", "deadline passed")."""
    code = (grpc.StatusCode.DEADLINE_EXCEEDED if reason == "deadline passed"
            else grpc.StatusCode.CANCELLED)
    return RequestError(code, f"{work} stopped: the client's call {reason}")


def _bounded(message: str) -> str:
    if len(message) <= MAX_STATUS_CHARS:
        return message
    return f"{message[:MAX_STATUS_CHARS]}... ({len(message)} characters in all)"


def rpc(method):
    """Turn RequestError into its status, an unknown model or version into NOT_FOUND, anything
    else into INTERNAL, logged, never a crash."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except RequestError as exc:
            context.abort(exc.code, _bounded(exc.message))
        except NotServed as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, _bounded(str(exc)))
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])

    return wrapper
