"""OpenAI's response bodies and server-sent event chunks, from a request's token events."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fedtune.serving.engine import TokenEvent
from fedtune.serving.http_errors import ApiError
from fedtune.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)


class Reply:
    """Turns one request's token events into OpenAI's response body or its SSE chunks.

    Args:
        body: The validated request (its ``stream_options`` decide the usage chunk).
        model: The ``JOB@ROUND`` (or ``base``) that answers, named in every chunk.
        stream: The engine's :class:`fedtune.serving.engine.RequestStream`.
        arrived: ``time.perf_counter()`` when the request arrived (time to first token, deadline).
        timeout: Seconds from arrival to the last token.
        metrics: Counts tokens and observes time to first token.
        chat: Chat completion chunks (``delta``) rather than text completion ones.
    """

    def __init__(self, body: Any, model: str, stream: Any, arrived: float, timeout: float, metrics: ServeMetrics,
                 *, chat: bool) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self.body = body
        self.stream = stream
        self.arrived = arrived
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self._first = True

    async def _events(self) -> AsyncIterator[TokenEvent]:
        """The stream's events, within the request's deadline; counts tokens and time to first token."""
        deadline = self.arrived + self.timeout
        events = self.stream.events().__aiter__()
        try:
            while True:
                remaining = deadline - time.perf_counter()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    event = await asyncio.wait_for(events.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError as e:  # the builtin TimeoutError only from Python 3.11
                    raise ApiError(504, f"the request took over {self.timeout:g}s (the server's "
                                   "--request-timeout); ask for fewer max_tokens", "timeout_error",
                                   code="timeout") from e
                if self._first and (event.token_ids or event.text):
                    self._first = False
                    self.metrics.time_to_first_token.observe(time.perf_counter() - self.arrived)
                if event.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {event.text or 'see the server log'}", "server_error")
                yield event
        finally:
            self.metrics.usage(self.stream.prompt_tokens, self.stream.completion_tokens)

    def _usage(self) -> dict[str, int]:
        prompt, completion = self.stream.prompt_tokens, self.stream.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(self) -> dict[str, Any]:
        """The whole answer (a non-streamed request)."""
        parts, finish = [], None
        async for event in self._events():
            parts.append(event.text)
            finish = event.finish_reason or finish
        text = "".join(parts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self._usage()}

    def _chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    async def sse(self, done: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per token event, usage when asked for, then ``[DONE]``."""
        try:
            if self.chat:
                yield _sse(self._chunk(None, None, role=True))
            async for event in self._events():
                if event.text or event.finish_reason:
                    yield _sse(self._chunk(event.text, event.finish_reason))
            if self.body.wants_usage_chunk():
                yield _sse({**self._chunk(None, None), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            # Headers are sent: the error travels as an event, the way OpenAI's streams carry one.
            log.warning("streamed request %s ended with an error: %s", self.id, e.message)
            yield _sse(e.body())
        finally:
            await done()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
