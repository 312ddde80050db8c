"""Held heartbeats (long-polls) as awaiting coroutines on the coordinator's event loop.

A client with nothing to do asks with ``wait_seconds`` > 0, and its call is held until a task or
step is ready for it. On the ``grpc.aio`` server a held call is a coroutine waiting on a future,
not a server thread, so every connected idle client can hold one: the old limit of 48 held calls
(64 server threads less 16 kept for other calls) is gone, and the bound that is left,
:data:`MAX_HELD_CALLS`, is one of memory (a held call costs a few KiB of gRPC call state).

The job engines run in threads (or, under Ray, a watcher thread follows them): they bump a job's
:class:`JobSignal`, which wakes the futures of that job's held calls on their loop with one
``call_soon_threadsafe`` per loop, whatever their number.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Offload = Callable[..., Awaitable[Any]]

# Held calls at once, at most. Not a thread count: each held call is a coroutine and gRPC's call
# state, a few KiB, so 10,000 of them stay well under 100 MiB; beyond it a heartbeat is answered at
# once (a plain poll, paced like any other).
MAX_HELD_CALLS = 10_000
# A held call with nothing to say ends at a random point in the last fifth of its time: clients
# that started together (all of them, after a coordinator restart) would otherwise re-ask together
# for ever, every wait_seconds, in one burst of calls that delays every other answer.
HOLD_JITTER = 0.2
# Held calls woken together (a round opens for 2,000 of them) poll again this many at a time: the
# pool's threads would otherwise all contend for the GIL and the state's lock at once, starving the
# event loop that sends the answers, so that each client waited for the whole herd's polls.
REPOLLS_AT_ONCE = 4


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_all(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        _resolve(future)


class JobSignal:
    """A job's change counter: held heartbeats wait on it, the engine bumps it (from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        self._closed = False
        self._watchers: dict[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = {}

    def _wake_all(self) -> None:
        # Called with the lock held: every future waiting now is woken on its own loop.
        watchers, self._watchers = self._watchers, {}
        for loop, futures in watchers.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, futures)
            except RuntimeError:  # that loop is closed: the server is gone
                pass

    def bump(self) -> None:
        """Something a waiting client may be told changed."""
        with self._lock:
            self.generation += 1
            self._wake_all()

    def poke(self) -> None:
        """Wakes the waiters without a change."""
        with self._lock:
            self._wake_all()

    def close(self) -> None:
        """The service stops: wakes every waiter, and later waits end at once."""
        with self._lock:
            self._closed = True
            self._wake_all()

    def watch(self, future: asyncio.Future[None], generation: int) -> bool:
        """Resolves ``future`` (on its loop) at the next bump or poke. False, with nothing
        registered, when the generation already moved past ``generation`` or the signal is closed."""
        with self._lock:
            if self._closed or self.generation != generation:
                return False
            self._watchers.setdefault(future.get_loop(), set()).add(future)
            return True

    def unwatch(self, future: asyncio.Future[None]) -> None:
        """Forgets ``future`` (its wait ended another way)."""
        with self._lock:
            futures = self._watchers.get(future.get_loop())
            if futures is not None:
                futures.discard(future)


class _Held:
    """One held call: the future its coroutine awaits now, and whether a newer call replaced it."""

    __slots__ = ("future", "superseded")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.superseded = False


class HeldCalls:
    """The held heartbeats, one per client, kept on the event loop (touched from it only)."""

    def __init__(self, limit: int = MAX_HELD_CALLS) -> None:
        self.limit = limit
        self._held: dict[str, _Held] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._repolls: asyncio.Semaphore | None = None

    def __len__(self) -> int:
        return len(self._held)

    def has_room(self, client_id: str) -> bool:
        """Whether a call of ``client_id`` may be held now (under the limit, or replacing its own)."""
        return len(self._held) < self.limit or client_id in self._held

    def client_ids(self) -> list[str]:
        """The clients holding a call now."""
        return list(self._held)

    async def hold(self, client_id: str, signal: JobSignal, generation: int, seconds: float,
                   stopping: threading.Event, repoll: Callable[[], Awaitable[T | None]],
                   touch: Callable[[list[str]], Awaitable[None]], refresh_seconds: float) -> T | None:
        """Waits up to ``seconds`` (less up to HOLD_JITTER of it, at random) for ``signal`` to move
        past ``generation``; at each move awaits
        ``repoll()``, and returns its answer once it is not None. None: the time is up, a newer call
        of the same client replaced this one, or the service stops (the caller says "ask again").

        The caller checks :meth:`has_room` first. While calls are held, ``touch(ids)`` refreshes their clients' presence
        every ``refresh_seconds``. A cancelled call (the client went away) ends the wait.
        """
        loop = asyncio.get_running_loop()
        if self._repolls is None:
            self._repolls = asyncio.Semaphore(REPOLLS_AT_ONCE)
        repolls = self._repolls
        held = _Held()
        older = self._held.get(client_id)
        self._held[client_id] = held
        if older is not None:  # one held call per client: the newer one ends the older
            older.superseded = True
            if older.future is not None:
                _resolve(older.future)
        if self._refresher is None or self._refresher.done():
            self._refresher = loop.create_task(self._refresh(touch, refresh_seconds), name="long-poll-presence")
        end = loop.time() + seconds * (1.0 - HOLD_JITTER * random.random())
        try:
            while not held.superseded and not stopping.is_set():
                remaining = end - loop.time()
                if remaining <= 0:
                    return None
                if signal.generation == generation:
                    future: asyncio.Future[None] = loop.create_future()
                    if not signal.watch(future, generation):
                        if signal.generation == generation:
                            return None  # the signal is closed: the service stops
                    else:
                        held.future = future
                        timer = loop.call_later(remaining, _resolve, future)
                        try:
                            await future
                        finally:
                            timer.cancel()
                            signal.unwatch(future)
                            held.future = None
                        if held.superseded or stopping.is_set():
                            return None
                if signal.generation != generation:
                    generation = signal.generation
                    async with repolls:
                        answer = await repoll()
                    if answer is not None:
                        return answer
            return None
        finally:
            if self._held.get(client_id) is held:
                del self._held[client_id]

    async def _refresh(self, touch: Callable[[list[str]], Awaitable[None]], seconds: float) -> None:
        """Refreshes the held clients' presence every ``seconds`` while any call is held."""
        while self._held:
            await asyncio.sleep(seconds)
            ids = list(self._held)
            if ids:
                try:
                    await touch(ids)
                except Exception:  # presence is refreshed again next time; held calls go on
                    log.exception("refreshing the presence of %d held clients failed", len(ids))
        self._refresher = None
