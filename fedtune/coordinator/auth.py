"""Authentication interceptor: every method is denied unless listed here with its credential.

Client calls are signed with the Ed25519 key the client enrolled (see fedtune.crypto.requests);
admin calls carry the coordinator's admin token in ``x-fedtune-admin``. Join and the standard
health service are open.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.coordinator.state import CoordinatorState
from fedtune.crypto.keys import ed25519_public
from fedtune.crypto.requests import CLIENT_KEY, SIG_KEY, TIME_KEY, verify_request
from fedtune.errors import AuthError, InvalidInput

ADMIN_KEY = "x-fedtune-admin"

OPEN = "open"
CLIENT = "client"
ADMIN = "admin"

_CLIENT_SVC = "/fedtune.v1.ClientService/"
_ADMIN_SVC = "/fedtune.v1.AdminService/"
METHODS: dict[str, str] = {
    _CLIENT_SVC + "Join": OPEN,
    _CLIENT_SVC + "Heartbeat": CLIENT,
    _CLIENT_SVC + "Download": CLIENT,
    _CLIENT_SVC + "Upload": CLIENT,
    _CLIENT_SVC + "SecAgg": CLIENT,
    _CLIENT_SVC + "ReportEval": CLIENT,
    _CLIENT_SVC + "Leave": CLIENT,
    **{_ADMIN_SVC + m: ADMIN for m in (
        "CreateJob", "ListJobs", "GetJob", "CancelJob", "CreateToken", "RevokeToken", "GetInfo", "ListAdapters",
        "PullAdapter", "TagAdapter", "UntagAdapter")},
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
}


def metadata_value(metadata: Any, key: str) -> str:
    """The first value of a metadata key, or ''."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


@functools.lru_cache(maxsize=65536)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    """The parsed key of an enrolled client (parsed once per key, not once per call)."""
    return ed25519_public(raw)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Denies by default; checks the credential each listed method needs."""

    def __init__(self, state: CoordinatorState, admin_token: str) -> None:
        self.state = state
        self.admin_token = admin_token

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Passes the call on only when its credential checks out."""
        kind = METHODS.get(details.method)
        handler = continuation(details)
        if kind is None:
            return _deny(handler, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {details.method}")
        if kind == ADMIN:
            given = metadata_value(details.invocation_metadata, ADMIN_KEY)
            if not given or not hmac.compare_digest(given, self.admin_token):
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "admin token missing or wrong: pass --state-dir of the coordinator or set FEDTUNE_ADMIN_TOKEN")
        elif kind == CLIENT:
            md = details.invocation_metadata
            client_id = metadata_value(md, CLIENT_KEY)
            try:
                if not client_id:
                    raise AuthError("unsigned request: join with an enrollment token first")
                client = self.state.client(client_id)
                verify_request(_public_key(client.sign_public_key), details.method, client_id,
                               metadata_value(md, TIME_KEY), metadata_value(md, SIG_KEY))
            except (AuthError, InvalidInput) as e:
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, str(e))
        return handler
