"""The request bodies of `fedtune serve`'s OpenAI-compatible API, validated at the boundary.

Field names, defaults and ranges follow OpenAI's API reference. Fields a client may send that we
have no use for (``user``, ``presence_penalty``, ...) are accepted and ignored, as OpenAI's
compatible servers do; fields that would change the answer and that we cannot honour (``n`` > 1,
``logprobs``, ``echo``, tools) are refused by name rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI accepts up to four stop sequences.
MAX_STOP_SEQUENCES = 4


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when not given)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def wants_usage_chunk(self) -> bool:
        """A streamed answer ends with a usage-only chunk (``stream_options.include_usage``)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or as token ids."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, le=0, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported")
    suffix: str | None = Field(None, max_length=0, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError(f"one prompt per request, got {len(value)}; send one request for each")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class ContentPart(BaseModel):
    """A part of a message's content; text parts only."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The ``{"role", "content"}`` mapping a chat template reads (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: a conversation rendered with the base's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="not supported")
    tools: list[Any] | None = Field(None, max_length=0, description="not supported")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def token_budget(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
