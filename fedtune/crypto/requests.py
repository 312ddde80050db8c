"""Signed, time-bounded client requests.

After joining, every client call carries its client id, the current time and an Ed25519
signature over (method, client id, time) with the key it enrolled. The coordinator checks the
signature against the enrolled public key and refuses times outside a window, so a credential
cannot be lifted from one request and used much later, and none is ever stored server-side.
"""

from __future__ import annotations

import base64
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.crypto.keys import raw_public_bytes
from fedtune.errors import AuthError

CLIENT_KEY = "x-fedtune-client"
TIME_KEY = "x-fedtune-time"
SIG_KEY = "x-fedtune-sig"
# An operator's key identity signs admin calls the same way; its id is its public key (base64).
ADMIN_ID_KEY = "x-fedtune-admin-key"
# Clock skew tolerated between a client and the coordinator.
MAX_SKEW_SECONDS = 300.0


def _message(method: str, client_id: str, timestamp: str) -> bytes:
    return f"fedtune/v1 request\n{method}\n{client_id}\n{timestamp}".encode()


def sign_request(key: Ed25519PrivateKey, method: str, client_id: str, now: float | None = None) -> list[tuple[str, str]]:
    """gRPC metadata authenticating one call of ``method`` (the full path, /pkg.Service/Method)."""
    ts = f"{time.time() if now is None else now:.3f}"
    sig = base64.b64encode(key.sign(_message(method, client_id, ts))).decode()
    return [(CLIENT_KEY, client_id), (TIME_KEY, ts), (SIG_KEY, sig)]


def sign_admin_request(key: Ed25519PrivateKey, method: str, now: float | None = None) -> list[tuple[str, str]]:
    """gRPC metadata authenticating one admin call by a key identity: :func:`sign_request` with the
    raw public key (base64) as the id, sent under ``x-fedtune-admin-key``."""
    kid = base64.b64encode(raw_public_bytes(key)).decode()
    return [(ADMIN_ID_KEY if k == CLIENT_KEY else k, v) for k, v in sign_request(key, method, kid, now)]


def verify_request(public_key: Ed25519PublicKey, method: str, client_id: str, timestamp: str, signature: str,
                   now: float | None = None) -> None:
    """Checks a signed request.

    Raises:
        AuthError: bad signature or a time outside the allowed window.
    """
    try:
        ts = float(timestamp)
        sig = base64.b64decode(signature, validate=True)
    except ValueError as e:
        raise AuthError("malformed request signature") from e
    now = time.time() if now is None else now
    if abs(now - ts) > MAX_SKEW_SECONDS:
        raise AuthError(f"request time is {now - ts:+.0f}s off the coordinator's clock (limit {MAX_SKEW_SECONDS:.0f}s)")
    try:
        public_key.verify(sig, _message(method, client_id, timestamp))
    except InvalidSignature as e:
        raise AuthError("request signature does not verify against the client's enrolled key") from e
