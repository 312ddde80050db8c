"""Authentication interceptor: every method is denied unless listed here with its credential.

Client calls are signed with the Ed25519 key the client enrolled (see fedtune.crypto.requests).
Every AdminService call goes through fedtune.coordinator.admin_access: a credential (the admin
token, an identity's token or key signature), the role its method needs in ADMIN_RPC_ROLES
(fedtune/coordinator/roles.py: an admin method missing there is refused for everyone), and one
audit line. Join and the standard health service are open.

The coordinator serves on a ``grpc.aio`` server: the interceptor is an aio one. Its checks read
SQLite and the identities file, so they run in the server's thread pool, never on the event loop;
every sync handler it passes on (all but Heartbeat) is wrapped to run in that pool too
(fedtune.coordinator.aio_bridge).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.coordinator.admin_access import AdminAccess
from fedtune.coordinator.aio_bridge import bridge
from fedtune.coordinator.roles import ADMIN_SERVICE
from fedtune.coordinator.state import CoordinatorState
from fedtune.crypto.keys import ed25519_public
from fedtune.crypto.requests import CLIENT_KEY, SIG_KEY, TIME_KEY, verify_request
from fedtune.errors import AuthError, InvalidInput

OPEN = "open"
CLIENT = "client"

_CLIENT_SVC = "/fedtune.v1.ClientService/"
# Admin methods are not listed here: each has its role in ADMIN_RPC_ROLES (fedtune/coordinator/roles.py).
METHODS: dict[str, str] = {
    _CLIENT_SVC + "Join": OPEN,
    _CLIENT_SVC + "Heartbeat": CLIENT,
    _CLIENT_SVC + "Download": CLIENT,
    _CLIENT_SVC + "Upload": CLIENT,
    _CLIENT_SVC + "SecAgg": CLIENT,
    _CLIENT_SVC + "ReportEval": CLIENT,
    _CLIENT_SVC + "Leave": CLIENT,
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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Denies by default; checks the credential each listed method needs (in ``pool``)."""

    def __init__(self, state: CoordinatorState, access: AdminAccess, pool: concurrent.futures.Executor) -> None:
        self.state = state
        self.access = access
        self.pool = pool

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Passes the call on only when its credential checks out; sync handlers run in the pool."""
        handler = await continuation(details)
        if METHODS.get(details.method) == OPEN:
            checked = handler  # nothing to read: no trip through the pool
        else:
            checked = await asyncio.get_running_loop().run_in_executor(self.pool, self.check, handler, details)
        return bridge(checked, self.pool)  # type: ignore[return-value]

    def check(self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        """The handler to run: ``handler`` when the call's credential checks out, else a refusal (blocking)."""
        if details.method.startswith(ADMIN_SERVICE):
            # Credential, role and an audit line, refusals included (deny by default).
            return self.access.gate(handler, details)
        kind = METHODS.get(details.method)
        if kind is None:
            return _deny(handler, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {details.method}")
        if kind == CLIENT:
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
