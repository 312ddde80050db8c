"""The OpenAI-compatible HTTP API of `fedtune serve` (FastAPI).

``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events in OpenAI's
chunk format when ``stream`` is set), ``GET /v1/models``; ``GET /health`` and ``GET /metrics`` for
operators. Every error is answered in OpenAI's shape with a stable status code, and none of them
stops the server: a request that fails changes nothing but its own counters.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedtune.errors import FedtuneError, InvalidInput
from fedtune.serving.adapters import BASE_MODEL_ID, AdapterPool, Lease, model_ids
from fedtune.serving.api_models import ChatCompletionRequest, CompletionRequest
from fedtune.serving.engine import SamplingParams
from fedtune.serving.http_errors import AdapterRejected, ApiError, from_domain, from_validation, too_many
from fedtune.serving.metrics import CONTENT_TYPE, UNKNOWN_MODEL, ServeMetrics
from fedtune.serving.responses import Reply

log = logging.getLogger(__name__)

# OpenAI's default for /v1/completions; chat completions default to what the context has room for.
DEFAULT_COMPLETION_TOKENS = 16


class Engine(Protocol):
    """The part of :class:`fedtune.serving.engine.GenerationEngine` the API uses."""

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> Any: ...


@dataclass(frozen=True)
class ServeSettings:
    """Limits and credentials of one server.

    Attributes:
        max_context: Tokens the base attends over (prompt plus completion).
        api_keys: Accepted bearer keys; empty: no key needed.
        max_body_bytes: Largest request body accepted (413 above).
        request_timeout: Seconds a request may take from arrival to its last token.
        max_concurrent: Generation requests in flight at once (429 with Retry-After above).
        base_name: What the base is (a preset, a directory or a hub id), shown in ``/v1/models``.
    """

    max_context: int
    api_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    max_concurrent: int = 64
    base_name: str = ""


@dataclass
class Runtime:
    """What the API serves with: the engine, the tokenizer, the adapter pool, the metrics."""

    engine: Engine
    tokenizer: Any
    pool: AdapterPool
    settings: ServeSettings
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    started: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with a 413, by Content-Length or as they arrive."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, self._error())
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._error()
            return message

        await self.app(scope, counted, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"request body is over {self.limit} bytes (the server's --max-body-bytes)",
                        code="request_too_large")


async def _send_error(send: Send, error: ApiError) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(rt: Runtime) -> FastAPI:
    """The FastAPI application over ``rt``."""
    app = FastAPI(title="fedtune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(FedtuneError)
    async def _domain_error(_request: Request, e: FedtuneError) -> JSONResponse:
        error = from_domain(e)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        error = ApiError(500, f"internal error ({type(e).__name__}); see the server log", "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        error = ApiError(400, f"invalid request: {e.errors()[0].get('msg', 'bad value')}")
        return JSONResponse(error.body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": rt.settings.base_name, "adapters_resident": len(rt.pool.resident),
                "requests_in_flight": rt.inflight}

    @app.get("/metrics")
    async def metrics() -> Response:
        rt.metrics.adapters_resident.set(len(rt.pool.resident))
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        _authorize(rt, request)
        return {"object": "list", "data": _model_cards(rt)}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        _authorize(rt, request)
        for card in _model_cards(rt):
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(rt, request, CompletionRequest, _completion_prompt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(rt, request, ChatCompletionRequest, _chat_prompt)

    return BodyLimit(app, rt.settings.max_body_bytes)  # type: ignore[return-value]


def _authorize(rt: Runtime, request: Request) -> None:
    keys = rt.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise ApiError(401, "no API key: send 'Authorization: Bearer KEY' with a key the server was started with "
                       "(--api-key / --api-key-file)", "authentication_error", code="invalid_api_key")
    # Compared against every key so that the time taken does not tell which one nearly matched.
    matches = [hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(401, "incorrect API key", "authentication_error", code="invalid_api_key")


def _model_cards(rt: Runtime) -> list[dict[str, Any]]:
    cards = [{"id": BASE_MODEL_ID, "object": "model", "created": rt.started, "owned_by": "fedtune",
              "root": rt.settings.base_name, "parent": None}]
    for adapter, manifest in rt.pool.servable():
        for model_id in model_ids(adapter):
            cards.append({"id": model_id, "object": "model", "created": int(manifest.get("created", 0)),
                          "owned_by": "fedtune", "root": adapter.ref, "parent": BASE_MODEL_ID})
    return cards


# ---------------------------------------------------------------------- prompts
PromptFn = Callable[[Runtime, Any], list[int]]


def _completion_prompt(rt: Runtime, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = len(rt.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):  # type: ignore[operator]
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        return list(prompt)  # type: ignore[arg-type]
    text = prompt[0] if isinstance(prompt, list) else prompt
    return list(rt.tokenizer(text)["input_ids"])


def _chat_prompt(rt: Runtime, body: ChatCompletionRequest) -> list[int]:
    if not getattr(rt.tokenizer, "chat_template", None):
        raise ApiError(400, f"the base model {rt.settings.base_name} has no chat template, so chat messages cannot "
                       "be rendered; use /v1/completions with a prompt, or serve a base whose tokenizer has one",
                       param="messages", code="chat_template_missing")
    try:
        text = rt.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages],
                                                tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template raising on this conversation (jinja's raise_exception, bad roles)
        raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from e
    return list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- generation
async def _generate(rt: Runtime, request: Request, model_cls: type[BaseModel], prompt_fn: PromptFn) -> Response:
    """Runs one generation request end to end; every failure becomes an OpenAI-shaped error."""
    arrived = time.perf_counter()
    label = UNKNOWN_MODEL
    lease: Lease | None = None
    slot = committed = False
    try:
        _authorize(rt, request)
        if rt.inflight >= rt.settings.max_concurrent:
            raise too_many(f"{rt.inflight} requests are in flight, the server's limit (--max-concurrent); "
                           "retry after the Retry-After seconds")
        rt.inflight += 1
        slot = True
        body = _parse(await _read_body(rt, request), model_cls)
        # Checked before the adapter is looked up: a bad request never costs a load.
        prompt_ids = prompt_fn(rt, body)
        params = _sampling(rt, body, len(prompt_ids))
        try:
            lease = await rt.pool.acquire(body.model)
        except AdapterRejected:
            label = body.model
            raise
        label = lease.canonical
        try:
            stream = rt.engine.submit(prompt_ids, lease.engine_name, params)
        except InvalidInput as e:
            raise from_domain(e, param="prompt") from e
        committed = True  # from here the response releases the lease and the slot
    except (ApiError, FedtuneError) as e:
        error = e if isinstance(e, ApiError) else from_domain(e)
        if isinstance(e, FedtuneError) and error.status >= 500:
            log.error("request failed: %s", e)
        rt.metrics.request(label, error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it
    finally:
        if not committed:
            if lease is not None:
                rt.pool.release(lease)
            if slot:
                rt.inflight -= 1

    done = _once(lambda: _finish(rt, lease, stream))
    reply = Reply(body, lease.canonical, stream, arrived, rt.settings.request_timeout, rt.metrics,
                  chat=isinstance(body, ChatCompletionRequest))
    if body.stream:
        rt.metrics.request(label, 200)
        return StreamingResponse(reply.sse(done), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(done))
    try:
        result = await reply.collect()
    except ApiError as e:
        rt.metrics.request(label, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    finally:
        await done()
    rt.metrics.request(label, 200)
    return JSONResponse(result)


async def _read_body(rt: Runtime, request: Request) -> bytes:
    """The request body, within the request's time limit (a client that trickles it in holds a slot)."""
    try:
        return await asyncio.wait_for(request.body(), rt.settings.request_timeout)
    except asyncio.TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {rt.settings.request_timeout:g}s "
                       "(the server's --request-timeout)", "timeout_error", code="timeout") from e


def _parse(raw: bytes, model_cls: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from e


def _sampling(rt: Runtime, body: Any, prompt_tokens: int) -> SamplingParams:
    context = rt.settings.max_context
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens "
                       "(prompt plus completion): shorten the prompt", param="messages" if isinstance(
                           body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    budget = body.token_budget() if isinstance(body, ChatCompletionRequest) else body.max_tokens
    room = context - prompt_tokens
    if budget is None:
        budget = room if isinstance(body, ChatCompletionRequest) else min(DEFAULT_COMPLETION_TOKENS, room)
    if budget > room:
        raise ApiError(400, f"max_tokens is {budget}, but the prompt's {prompt_tokens} tokens leave room for "
                       f"{room} of this model's {context}: lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    return SamplingParams(max_tokens=budget, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, stop=body.stop_sequences(), seed=body.seed)


def _once(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    called = False

    async def run() -> None:
        nonlocal called
        if not called:
            called = True
            fn()

    return run


def _finish(rt: Runtime, lease: Lease | None, stream: Any) -> None:
    stream.cancel()  # a no-op for a finished stream; stops one whose client went away
    if lease is not None:
        rt.pool.release(lease)
    rt.inflight -= 1
