"""How CLI commands reach a coordinator's admin API: address and admin credential resolution."""

from __future__ import annotations

import base64
import functools
import inspect
import json
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.client.channel import INSECURE, ClientTls, open_channel
from fedtune.coordinator.roles import ADMIN_SERVICE
from fedtune.crypto.keys import read_ed25519_private
from fedtune.crypto.requests import sign_admin_request
from fedtune.errors import AuthError, FedtuneError, Unavailable, from_rpc_error
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc

ADMIN_KEY = "x-fedtune-admin"
DEFAULT_ADDRESS = "127.0.0.1:50051"
# A coordinator listening on every interface is reached over loopback from its own machine.
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def resolve_address(coordinator: str | None, state_dir: Path | None) -> str:
    """--coordinator, else the address a local coordinator wrote in its state dir, else the default."""
    if coordinator:
        return coordinator
    if state_dir is not None and (state_dir / "coordinator.json").exists():
        address: str = json.loads((state_dir / "coordinator.json").read_text())["address"]
        host, _, port = address.rpartition(":")
        return f"127.0.0.1:{port}" if host in _WILDCARD_HOSTS else address
    return DEFAULT_ADDRESS


def resolve_admin_token(admin_token: str | None, state_dir: Path | None) -> str:
    """--admin-token / FEDTUNE_ADMIN_TOKEN, else the token file in the coordinator's state dir."""
    if admin_token:
        return admin_token
    if state_dir is not None:
        path = state_dir / "admin.token"
        if path.exists():
            return path.read_text().strip()
        raise AuthError(f"no admin token in {state_dir}: has a coordinator been started there?")
    raise AuthError("admin token needed: pass --state-dir of the coordinator, --admin-token, "
                    "or set FEDTUNE_ADMIN_TOKEN")


class AdminClient:
    """A stub plus credentials; each call maps gRPC errors to domain errors.

    The credential is a token (the coordinator's admin token or an identity's), or the private key
    of a key identity, which signs each call (method and time) the way client agents sign theirs.
    """

    def __init__(self, address: str, token: str, tls: ClientTls, key: Ed25519PrivateKey | None = None) -> None:
        self.address = address
        self.tls = tls
        self.channel = open_channel(address, tls)
        self.stub = pb_grpc.AdminServiceStub(self.channel)
        self.key = key
        self.metadata = [(ADMIN_KEY, token)] if key is None else []

    def credentials(self, method: str) -> list[tuple[str, str]]:
        """The metadata authenticating one call of ``method`` (its name in AdminService)."""
        return self.metadata if self.key is None else sign_admin_request(self.key, ADMIN_SERVICE + method)

    @classmethod
    def from_options(cls, coordinator: str | None, state_dir: Path | None, admin_token: str | None,
                     ca_cert: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                     insecure: bool = False, admin_key: Path | None = None) -> AdminClient:
        """Builds a client from the common CLI options and environment (``admin_key`` wins over tokens)."""
        state_dir = state_dir or (Path(os.environ["FEDTUNE_STATE_DIR"]) if os.environ.get("FEDTUNE_STATE_DIR") else None)
        tls = ClientTls(ca_cert, client_cert, client_key, insecure)
        if not insecure and ca_cert is None and client_cert is None and coordinator is None and state_dir is not None:
            # A local coordinator its operator started with --insecure: talk plaintext to it.
            info = state_dir / "coordinator.json"
            if info.exists() and json.loads(info.read_text()).get("tls") is False:
                tls = INSECURE
        address = resolve_address(coordinator, state_dir)
        if admin_key is not None:
            return cls(address, "", tls, read_ed25519_private(admin_key))
        return cls(address, resolve_admin_token(admin_token, state_dir), tls)

    def call(self, method: str, request: object, timeout: float = 120.0) -> object:
        """Calls a unary admin method by name."""
        try:
            return getattr(self.stub, method)(request, metadata=self.credentials(method), timeout=timeout)
        except grpc.RpcError as e:
            raise self.error(e) from e

    def error(self, err: grpc.RpcError) -> FedtuneError:
        """The domain error for a failed call: what is wrong with the connection, and the flag that
        fixes it, when the call never reached the coordinator; else the coordinator's own answer."""
        problem = self.tls.diagnose(err, self.address)
        if problem is None:
            return from_rpc_error(err)
        return AuthError(problem.message) if problem.credentials else Unavailable(problem.message)

    def signing_key(self) -> str:
        """The coordinator's manifest-signing key as `adapters verify --public-key` takes it (base64)."""
        info = self.call("GetInfo", pb.GetInfoRequest())
        return base64.b64encode(info.signing_public_key).decode()  # type: ignore[attr-defined]

    def stream(self, method: str, request: object, timeout: float = 600.0) -> object:
        """Calls a streaming admin method by name; iterate the result inside ``guard``."""
        return getattr(self.stub, method)(request, metadata=self.credentials(method), timeout=timeout)

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()


_CONNECTION_PARAMS = ("coordinator", "state_dir", "admin_token", "admin_key", "ca_cert", "client_cert", "client_key",
                      "insecure")


def admin_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Gives a CLI command the connection options (--coordinator, --state-dir, --admin-token or
    --admin-key, and the TLS files) and calls it with ``client``, an :class:`AdminClient` built from them."""
    from fedtune.cli import options

    annotations = {
        "coordinator": options.Coordinator, "state_dir": options.StateDir, "admin_token": options.AdminToken,
        "admin_key": options.AdminKey,
        "ca_cert": options.CaCert, "client_cert": options.ClientCert, "client_key": options.ClientKey,
        "insecure": options.Insecure,
    }
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(fn).parameters.values()
           if p.name != "client"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotations[name],
                               default=False if name == "insecure" else None) for name in _CONNECTION_PARAMS]
    # Keyword-only parameters must follow the command's own; typer reads order for --help only.
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        conn = {name: kwargs.pop(name) for name in _CONNECTION_PARAMS}
        return fn(client=AdminClient.from_options(**conn), **kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__
    return wrapper
