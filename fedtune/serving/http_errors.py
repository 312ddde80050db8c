"""Errors of the HTTP API in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Domain errors (fedtune.errors) raised below the API map to one status here, as they map to one
gRPC status at the coordinator's servicers.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fedtune.errors import (
    AuthError,
    FedtuneError,
    InvalidInput,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unavailable,
)

# Seconds a client told "429" is asked to wait before it tries again.
RETRY_AFTER_SECONDS = 1


class AdapterRejected(FedtuneError):
    """A published adapter that does not verify (signature, file hashes, base) and is never served."""

    exit_code = InvalidInput.exit_code


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape.

    Attributes:
        status: The HTTP status code.
        message: One line naming the problem and, where there is one, the fix.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: The request field at fault, or None.
        code: A stable machine-readable code, or None.
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def too_many(message: str) -> ApiError:
    """A 429 that tells the client when to come back."""
    return ApiError(429, message, "rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def from_domain(e: FedtuneError, *, param: str | None = None) -> ApiError:
    """The HTTP error for a domain error raised while answering a request."""
    if isinstance(e, AdapterRejected):
        # Not retried by clients (unlike 409 and 5xx): the adapter stays refused until republished.
        return ApiError(422, str(e), "invalid_request_error", param="model", code="adapter_verification_failed")
    if isinstance(e, NotFound):
        return ApiError(404, str(e), "invalid_request_error", param="model", code="model_not_found")
    if isinstance(e, LimitExceeded):
        return too_many(str(e))
    if isinstance(e, AuthError):
        return ApiError(401, str(e), "authentication_error", code="invalid_api_key")
    if isinstance(e, PermissionDenied):
        return ApiError(403, str(e), "permission_error")
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), "server_error", code="unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, InvalidInput):
        return ApiError(400, str(e), "invalid_request_error", param=param)
    return ApiError(500, str(e) or type(e).__name__, "server_error")


def from_validation(e: ValidationError) -> ApiError:
    """A 400 naming the first bad field of a request body and what is wrong with it."""
    first = e.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    # A union reports each alternative it tried (``prompt.str``); the field is what a user wrote.
    param = loc[0] if loc else None
    where = ".".join(p for p in loc if not p.startswith(("str", "list[", "int", "float", "bool"))) or param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return ApiError(400, f"missing required parameter '{where}'", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid '{where}': {message}", param=param, code="invalid_value")
