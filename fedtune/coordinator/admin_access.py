"""Who is calling the admin API, whether their role allows the call, and the audit line for it.

The auth interceptor hands every AdminService call to :meth:`AdminAccess.gate`, which

1. authenticates the caller: the state dir's ``admin.token`` (the built-in admin), a scoped token
   of an identity (both in ``x-fedtune-admin``), or a key identity's signature (the client request
   signature of fedtune.crypto.requests, its key id in ``x-fedtune-admin-key``);
2. looks up the role the method needs in ``ADMIN_RPC_ROLES`` (fedtune/coordinator/roles.py): no
   entry, no call, for anyone;
3. runs the call, or refuses it before the handler runs (so a refusal changes no state), and
   appends one audit line either way.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedtune.coordinator.audit import AuditLog, AuditRecord, describe, result_of
from fedtune.coordinator.identities import LEGACY_NAME, IdentityStore
from fedtune.coordinator.roles import ADMIN_RPC_ROLES, Role, allows, method_name, required_role
from fedtune.crypto.keys import ed25519_public
from fedtune.crypto.requests import ADMIN_ID_KEY, MAX_SKEW_SECONDS, SIG_KEY, TIME_KEY, verify_request
from fedtune.errors import AuthError, FedtuneError, InvalidInput, PermissionDenied

log = logging.getLogger(__name__)

ADMIN_KEY = "x-fedtune-admin"
NO_CREDENTIAL = ("admin token missing or wrong: pass --state-dir of the coordinator or set FEDTUNE_ADMIN_TOKEN "
                 "(or --admin-key FILE for a key identity)")


@dataclass(frozen=True)
class Caller:
    """An authenticated admin caller (or, for a refusal, who it claimed to be)."""

    who: str
    auth: str  # admin-token, token, key, none
    role: Role | None


# The caller of the admin call running in this thread, for handlers that record who acted.
_CALLER: ContextVar[Caller | None] = ContextVar("fedtune_admin_caller", default=None)


def current_caller() -> Caller | None:
    """The authenticated caller of the admin call being handled, if any."""
    return _CALLER.get()


def _value(metadata: Any, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def _roles_from(required: Role) -> str:
    return " or ".join(str(r) for r in Role if r >= required)


class Unverified(AuthError):
    """An admin credential that does not check out, with who the caller claimed to be."""

    def __init__(self, message: str, who: str, auth: str) -> None:
        super().__init__(message)
        self.who = who
        self.auth = auth


class SeenSignatures:
    """Key signatures accepted within the clock window: one signed call's metadata, lifted off the
    wire, cannot be sent again (with another request body) while its time is still accepted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def first_use(self, signature: str) -> bool:
        """Records ``signature``; False when it was seen within the window."""
        now = time.time()
        with self._lock:
            if len(self._until) > 4096:
                self._until = {s: t for s, t in self._until.items() if t > now}
            if signature in self._until:
                return False
            # Its time is within MAX_SKEW_SECONDS of now, so it expires at the latest 2x that from now.
            self._until[signature] = now + 2 * MAX_SKEW_SECONDS
            return True


class AdminAccess:
    """Identities, roles and the audit log of one coordinator's admin API."""

    def __init__(self, state_dir: Path, legacy_token: str) -> None:
        self.legacy_token = legacy_token
        self.identities = IdentityStore(state_dir)
        self.audit = AuditLog(state_dir)
        self.seen = SeenSignatures()

    # ------------------------------------------------------------------ the checks
    def authenticate(self, metadata: Any, method: str) -> Caller:
        """The caller a call's metadata proves.

        Raises:
            Unverified: no credential, an unknown one, or a bad, stale or replayed signature; the
                error names who the caller claimed to be, when it named anyone.
        """
        kid = _value(metadata, ADMIN_ID_KEY)
        if kid:
            ident = self.identities.by_key_id(kid)
            if ident is None:
                raise Unverified("admin key is not registered with this coordinator: an admin adds it with "
                                 "`fedtune admin add NAME --role ROLE --public-key FILE`", "unknown key", "key")
            try:
                public = ed25519_public(base64.b64decode(kid, validate=True))
                verify_request(public, method, kid, _value(metadata, TIME_KEY), _value(metadata, SIG_KEY))
            except (AuthError, InvalidInput, binascii.Error) as e:
                why = ("the signature does not verify against its registered public key" if "does not verify" in str(e)
                       else str(e))
                raise Unverified(f"admin key of {ident.name!r}: {why}", ident.name, "key") from e
            if not self.seen.first_use(_value(metadata, SIG_KEY)):
                raise Unverified(f"admin key of {ident.name!r}: this signed call was already made once (a replay): "
                                 "every call is signed afresh", ident.name, "key")
            return Caller(ident.name, "key", ident.level)
        token = _value(metadata, ADMIN_KEY)
        if token and hmac.compare_digest(token.encode(), self.legacy_token.encode()):
            return Caller(LEGACY_NAME, "admin-token", Role.ADMIN)
        ident = self.identities.by_token(token) if token else None
        if ident is None:
            raise Unverified(NO_CREDENTIAL, "unknown", "token" if token else "none")
        return Caller(ident.name, "token", ident.level)

    @staticmethod
    def authorize(caller: Caller, method: str) -> None:
        """Passes when the caller's role may call ``method``.

        Raises:
            PermissionDenied: the method has no entry in the role table, or needs a higher role.
        """
        name = method_name(method)
        needed = required_role(name)
        if needed is None:
            raise PermissionDenied(
                f"{name} has no entry in ADMIN_RPC_ROLES (fedtune/coordinator/roles.py), so no role may call it "
                f"(known: {len(ADMIN_RPC_ROLES)} methods); this is a coordinator bug: report it")
        if caller.role is None or not allows(caller.role, needed):
            raise PermissionDenied(f"{name} needs role {_roles_from(needed)}; {caller.who} has role {caller.role}: "
                                   f"ask an admin for an identity with role {needed}")

    # ------------------------------------------------------------------ the interceptor's part
    def gate(self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        """The handler to run for an admin call: the real one, audited, or a refusal, audited."""
        name = method_name(details.method)
        if handler is None:
            return self._refuse(None, name, Caller("unknown", "none", None), grpc.StatusCode.UNIMPLEMENTED,
                                f"unknown method {details.method}")
        try:
            caller = self.authenticate(details.invocation_metadata, details.method)
        except Unverified as e:
            return self._refuse(handler, name, Caller(e.who, e.auth, None), e.status, str(e))
        except FedtuneError as e:  # e.g. an unreadable identities file: refused, and said why
            return self._refuse(handler, name, Caller("unknown", "none", None), e.status, str(e))
        try:
            self.authorize(caller, details.method)
        except PermissionDenied as e:
            return self._refuse(handler, name, caller, e.status, str(e))
        return self._audited(handler, name, caller)

    def _record(self, caller: Caller, name: str, request: Any, context: grpc.ServicerContext, outcome: str,
                code: grpc.StatusCode, message: str = "", reply: Any = None) -> None:
        try:
            record = AuditRecord(
                who=caller.who, auth=caller.auth, role=str(caller.role) if caller.role else "", method=name,
                request=describe(request), outcome=outcome, code=code.name, message=message,
                result=result_of(reply) or None, peer=context.peer() or "")
            self.audit.append(record)
        except Exception:  # the call has run: its answer must not turn into an audit error
            log.exception("audit record of %s by %s (%s) failed", name, caller.who, outcome)

    def _refuse(self, handler: grpc.RpcMethodHandler | None, name: str, caller: Caller, code: grpc.StatusCode,
                message: str) -> grpc.RpcMethodHandler:
        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            self._record(caller, name, request if not _streams_in(handler) else None, context, "denied", code, message)
            context.abort(code, message)

        return _with_behavior(handler, refuse)

    def _audited(self, handler: grpc.RpcMethodHandler, name: str, caller: Caller) -> grpc.RpcMethodHandler:
        inner = _behavior(handler)
        streams_in = _streams_in(handler)

        def finish(request: Any, context: grpc.ServicerContext, error: BaseException | None, reply: Any = None,
                   cancelled: bool = False) -> None:
            code = grpc.StatusCode.CANCELLED if cancelled else \
                context.code() or (grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK)
            details = context.details() or b""
            message = details.decode(errors="replace") if isinstance(details, bytes) else str(details)
            outcome = "ok" if code == grpc.StatusCode.OK else "cancelled" if code == grpc.StatusCode.CANCELLED \
                else "error"
            self._record(caller, name, None if streams_in else request, context, outcome, code, message, reply)

        if handler.response_streaming:
            def run_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner(request, context)
                except GeneratorExit:  # the caller went away mid-stream
                    finish(request, context, None, cancelled=True)
                    raise
                except BaseException as e:
                    finish(request, context, e)
                    raise
                finish(request, context, None)

            return _with_behavior(handler, run_stream)

        def run_unary(request: Any, context: grpc.ServicerContext) -> Any:
            reset = _CALLER.set(caller)
            try:
                reply = inner(request, context)
            except BaseException as e:
                finish(request, context, e)
                raise
            finally:
                _CALLER.reset(reset)
            finish(request, context, None, reply)
            return reply

        return _with_behavior(handler, run_unary)


def _streams_in(handler: grpc.RpcMethodHandler | None) -> bool:
    return bool(handler is not None and handler.request_streaming)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (handler.stream_stream or handler.stream_unary or handler.unary_stream  # type: ignore[no-any-return]
            or handler.unary_unary)


def _with_behavior(handler: grpc.RpcMethodHandler | None, fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape (streaming or not) as ``handler`` that runs ``fn``."""
    if handler is None:
        return grpc.unary_unary_rpc_method_handler(fn)
    shape = ("stream_" if handler.request_streaming else "unary_") + \
        ("stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{shape}_rpc_method_handler")
    return make(  # type: ignore[no-any-return]
        fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
