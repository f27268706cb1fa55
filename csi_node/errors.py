"""Errors that carry their CSI status code, and the one decorator that turns them into statuses.

Every check in the node plugin raises :class:`CsiError` (or a subclass naming the code) with a
message that names the volume and the path; :func:`rpc` is the only place that calls
``context.abort``. This keeps each RPC a straight line of steps instead of repeated
"if bad: context.abort(...); return" blocks, and makes the mapping from Python failures to gRPC
codes one table:

* :class:`CsiError` -> its own code;
* ``OSError`` from a mount syscall or the filesystem -> INTERNAL, with errno and path (an OSError
  that means "try again" is raised as :class:`Unavailable` by the code that knows that);
* anything else -> INTERNAL, with the traceback in the log only.

The spec requires ``status.details`` to stay empty, which ``context.abort`` guarantees.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Any])


class CsiError(Exception):
    """A failure with the gRPC status code the CSI spec assigns to it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(CsiError):
    """A required field is missing or a value is malformed (final: the CO must change the call)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    """The volume does not exist on this node, or not at the given path."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    """The target already holds this volume (or another) with incompatible parameters."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    """The request asks for something this volume cannot do (a write mode, a block device)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CsiError):
    """Another operation holds this target; non-final, so kubelet retries."""

    code = grpc.StatusCode.ABORTED


class Unavailable(CsiError):
    """The FUSE view is not live yet; non-final, so kubelet retries with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


def rpc(handler: Handler) -> Handler:
    """Map exceptions raised by a servicer method to ``context.abort`` with the right code.

    Wraps ``method(self, request, context)``. ``context.abort`` itself raises, so the wrapper
    never returns after an error.
    """

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except CsiError as exc:
            context.abort(exc.code, exc.message)
        except OSError as exc:
            where = f" at {exc.filename}" if exc.filename else ""
            log.warning("%s failed: %s", handler.__name__, exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__}: {exc.strerror or exc}{where}")
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__}: internal error (see plugin log)")
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper  # type: ignore[return-value]
