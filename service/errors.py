"""Request errors carry the gRPC status and a message naming the field and the fix."""

from __future__ import annotations

import functools
import logging

import grpc

from .repository import NotServed

log = logging.getLogger("xaiserve.server")


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def rpc(method):
    """Turn RequestError into its status, an unknown model or version into NOT_FOUND, anything
    else into INTERNAL, logged, never a crash."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except RequestError as exc:
            context.abort(exc.code, exc.message)
        except NotServed as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])

    return wrapper
