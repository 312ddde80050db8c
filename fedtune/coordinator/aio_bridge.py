"""Runs the coordinator's sync servicer methods on its ``grpc.aio`` server, in a thread pool.

The coordinator serves on a ``grpc.aio`` server so that a held heartbeat (long-poll) is an
awaiting coroutine rather than a blocked thread. Every other method (Join, Upload, Download, the
admin API, health) is ordinary blocking code over SQLite and files, and stays so: the auth
interceptor hands each such handler to :func:`bridge`, which wraps it in an ``async`` handler
that runs it in the pool, so nothing slow runs on the event loop.

grpc's own path for sync handlers on an aio server gives them a context without ``code()``,
``details()`` or ``is_active()`` (the admin audit reads the first two), so the wrapping is done
here, with :class:`SyncContext` offering the sync ``grpc.ServicerContext`` methods the servicers
use. A streamed reply is pulled from the handler's iterator one item ahead in the pool (the next
Download chunk is read while the last one is sent); a streamed request is handed to the handler
as a blocking iterator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

_DONE = object()
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def async_unary(fn: F) -> F:
    """Wraps an ``async`` handler returning one reply: a domain error becomes its status code
    (as :func:`fedtune.coordinator.rpc_errors.unary` does for sync handlers)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except FedtuneError as e:
            await context.abort(e.status, str(e))
        except Exception as e:  # every error ends as a status, none escapes
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error ({type(e).__name__}); see the coordinator log")

    return wrapper  # type: ignore[return-value]


def offloader(pool: concurrent.futures.Executor) -> Callable[..., Awaitable[Any]]:
    """``await offload(fn, *args)``: runs blocking ``fn(*args)`` in ``pool`` from the event loop."""

    async def offload(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    return offload


def is_async(behavior: Callable[..., Any]) -> bool:
    """Whether a handler's behaviour runs on the event loop (a coroutine or async generator function)."""
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class Aborted(Exception):
    """Raised by :meth:`SyncContext.abort` in the handler; the status is sent once the handler has returned."""


class SyncContext:
    """The sync ``grpc.ServicerContext`` API over an aio call's context, for a handler in a pool thread.

    As on grpc's sync server, ``abort`` raises and the status goes out after the handler ends (so,
    for one, an admin call's audit line is written before its caller hears the answer).
    """

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self.ended = False  # the caller went away, or the call was cancelled
        self.aborted: tuple[grpc.StatusCode, str, tuple[Any, ...]] | None = None

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple[Any, ...] = ()) -> None:
        """Ends the call with ``code`` and raises (as the sync API does)."""
        self.aborted = (code, details, tuple(trailing_metadata))
        self._context.set_code(code)
        self._context.set_details(details)
        raise Aborted(f"{code.name}: {details}")

    def abort_with_status(self, status: Any) -> None:
        """Ends the call with a ``grpc.Status`` and raises."""
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, metadata: Any) -> None:
        """Sends the initial metadata now."""
        self._on_loop(self._context.send_initial_metadata(metadata))

    def is_active(self) -> bool:
        """Whether the call is still running (not ended, cancelled or answered)."""
        return not self.ended and not self._context.done()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Calls ``callback`` when the call ends."""
        self._context.add_done_callback(lambda _context: callback())
        return True

    def invocation_metadata(self) -> Any:
        """The call's metadata."""
        return self._context.invocation_metadata()

    def peer(self) -> str:
        """The caller's address."""
        return str(self._context.peer())

    def peer_identities(self) -> Any:
        """The caller's TLS identities, if any."""
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        """The property naming the caller's identities."""
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        """The call's auth context."""
        return self._context.auth_context()

    def time_remaining(self) -> Any:
        """Seconds left before the call's deadline, or None."""
        return self._context.time_remaining()

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status code the call ends with."""
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        """The status message the call ends with."""
        self._context.set_details(details)

    def code(self) -> Any:
        """The status code set so far, or None."""
        return self._context.code()

    def details(self) -> Any:
        """The status message set so far."""
        return self._context.details()

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Trailing metadata sent with the status."""
        self._context.set_trailing_metadata(tuple(metadata))

    def set_compression(self, compression: Any) -> None:
        """The call's compression."""
        self._context.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        """Sends the next reply uncompressed."""
        self._context.disable_next_message_compression()


class _BlockingRequests:
    """A streamed request as the blocking iterator a sync handler expects (each read on the loop)."""

    def __init__(self, requests: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._requests = requests
        self._loop = loop

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(self._requests.__anext__(), self._loop).result()
        except StopAsyncIteration:
            raise StopIteration from None


def _next(iterator: Iterator[Any]) -> Any:
    return next(iterator, _DONE)


def bridge(handler: grpc.RpcMethodHandler | None, pool: concurrent.futures.Executor) -> grpc.RpcMethodHandler | None:
    """``handler`` as an async handler: a sync one runs in ``pool``. A single request that is not
    the method's message type is refused with INVALID_ARGUMENT (grpc.aio would answer UNKNOWN)."""
    if handler is None:
        return None
    behavior = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    deserializer = handler.request_deserializer
    if is_async(behavior):
        if handler.request_streaming or deserializer is None:
            return handler
        run: Callable[..., Any] = _decoding(behavior, deserializer, handler.response_streaming)
        return _same_shape(handler, run, None)

    async def call(request: Any, context: Any, loop: asyncio.AbstractEventLoop, sync: SyncContext) -> Any:
        if handler.request_streaming:
            request = _BlockingRequests(request, loop)
        try:
            reply = await loop.run_in_executor(pool, behavior, request, sync)
        except asyncio.CancelledError:
            sync.ended = True
            raise
        except Exception:
            await _send_abort(context, sync)
            raise
        await _send_abort(context, sync)  # aborted, and the handler went on: the abort stands
        return reply

    if not handler.response_streaming:
        async def unary(request: Any, context: Any) -> Any:
            loop = asyncio.get_running_loop()
            return await call(request, context, loop, SyncContext(context, loop))

        run = unary
    else:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            sync = SyncContext(context, loop)
            iterator: Iterator[Any] = iter(await call(request, context, loop, sync))
            pending: concurrent.futures.Future[Any] | None = pool.submit(_next, iterator)
            finished = False
            try:
                while True:
                    assert pending is not None
                    try:
                        item = await asyncio.wrap_future(pending)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        finished = True  # the handler raised (an abort, say): it is over
                        await _send_abort(context, sync)
                        raise
                    pending = None
                    if item is _DONE:
                        finished = True
                        return
                    # The next item is read in the pool while this one is sent.
                    pending = pool.submit(_next, iterator)
                    yield item
            except asyncio.CancelledError:
                sync.ended = True
                raise
            finally:
                if not finished:
                    _close_after(pending, iterator, pool)

        run = stream
    if not handler.request_streaming and deserializer is not None:
        run, deserializer = _decoding(run, deserializer, handler.response_streaming), None
    return _same_shape(handler, run, deserializer)


def _same_shape(handler: grpc.RpcMethodHandler, run: Callable[..., Any],
                deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    shape = ("stream_" if handler.request_streaming else "unary_") + \
        ("stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{shape}_rpc_method_handler")
    return make(  # type: ignore[no-any-return]
        run, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _decoding(run: Callable[..., Any], deserialize: Callable[[bytes], Any], streaming: bool) -> Callable[..., Any]:
    """``run`` taking the request's bytes: parsed here, a malformed one refused with INVALID_ARGUMENT."""

    async def decode(raw: bytes, context: Any) -> Any:
        try:
            return deserialize(raw)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or whatever a parser raises
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}")

    if streaming:
        async def stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            request = await decode(raw, context)
            async for item in run(request, context):
                yield item

        return stream

    async def unary(raw: bytes, context: Any) -> Any:
        return await run(await decode(raw, context), context)

    return unary


async def _send_abort(context: Any, sync: SyncContext) -> None:
    """Sends the status a handler aborted with, if it did (raises grpc's AbortError then)."""
    if sync.aborted is not None:
        code, details, trailing = sync.aborted
        await context.abort(code, details, trailing)


def _close_after(pending: concurrent.futures.Future[Any] | None, iterator: Iterator[Any],
                 pool: concurrent.futures.Executor) -> None:
    """Closes a sync reply generator (its ``finally`` blocks run) in the pool, once no read of it is running."""
    close = getattr(iterator, "close", None)
    if close is None:
        return

    def submit(_f: object = None) -> None:
        try:
            pool.submit(close)
        except RuntimeError:  # the pool is shut down: the service is stopping
            close()

    if pending is None:
        submit()
    else:
        pending.add_done_callback(submit)
