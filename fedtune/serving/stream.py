"""What a caller of the engine holds: a request's stream of token events, blocking or asyncio.

The decode thread pushes events; one consumer takes them, by iterating (a worker thread) or with
`RequestStream.events` (an asyncio handler, woken through its loop without a thread per stream).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenEvent:
    """A piece of a request's completion.

    Attributes:
        text: New text since the previous event (stop strings cut, incomplete characters held back).
        token_ids: The tokens generated since the previous event.
        finish_reason: None while running; "stop" (a stop string or the end-of-text token),
            "length" (max_tokens or the context reached) or "error" on the last event.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


class RequestStream:
    """The events of one request, for one consumer: iterate (blocking) or `events()` (asyncio).

    Attributes:
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = threading.Event()
        self.finished = False

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self.completion_tokens += len(event.token_ids)
            self.finished = event.finish_reason is not None
            self._events.append(event)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, flag in wakers:
            loop.call_soon_threadsafe(flag.set)

    def _ended(self) -> bool:
        return self._cancelled.is_set() and not self._events

    def __iter__(self) -> Iterator[TokenEvent]:
        """Yields events as they come, until the one with a finish reason (or a cancel)."""
        while True:
            with self._cond:
                while not self._events and not self._cancelled.is_set():
                    self._cond.wait()
                if self._ended():
                    return
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Like iterating, without blocking the event loop."""
        flag = asyncio.Event()
        waker = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                flag.clear()  # before looking, so that a push after the look sets it again
                with self._cond:
                    if self._ended():
                        return
                    event = self._events.popleft() if self._events else None
                if event is None:
                    await flag.wait()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def cancel(self) -> None:
        """The client went away: the request leaves its batch before the next decode step."""
        self._cancelled.set()
        with self._cond:
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, flag in wakers:
            loop.call_soon_threadsafe(flag.set)

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._cancelled.is_set()
