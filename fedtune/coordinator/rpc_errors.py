"""Maps domain errors to gRPC status codes at the servicer boundary."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    if isinstance(err, FedtuneError):
        context.abort(err.status, str(err))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); see the coordinator log")


def unary(fn: F) -> F:
    """Wraps a handler returning one reply: a domain error becomes its status code."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error ends as a status, none escapes
            _abort(context, e)

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Wraps a handler yielding replies: a domain error becomes its status code."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            _abort(context, e)

    return wrapper  # type: ignore[return-value]
