"""Signed adapter manifests: the coordinator signs fedtune.json with its Ed25519 key.

The signature covers the canonical JSON (sorted keys, no spaces) of the manifest without its
``signature`` field; the manifest lists every file's sha256, so one signature covers the adapter.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.crypto.keys import ed25519_public, raw_public_bytes
from fedtune.errors import InvalidInput

ALG = "ed25519"


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: the manifest minus its signature, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``manifest`` with a ``signature`` field."""
    sig = key.sign(canonical(manifest))
    return {**manifest, "signature": {
        "alg": ALG,
        "public_key": base64.b64encode(raw_public_bytes(key)).decode(),
        "value": base64.b64encode(sig).decode(),
    }}


def verify_manifest(manifest: dict[str, Any], trusted_public_key: str | None = None) -> str:
    """Checks a manifest's signature; returns the signer's public key (base64).

    Args:
        manifest: The parsed fedtune.json.
        trusted_public_key: When given (base64 raw Ed25519), the signer must be this key.

    Raises:
        InvalidInput: unsigned, malformed, signed by another key than the trusted one, or altered.
    """
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != ALG:
        raise InvalidInput("manifest is not signed (no ed25519 signature in fedtune.json)")
    signer = str(sig.get("public_key", ""))
    if trusted_public_key is not None and signer != trusted_public_key.strip():
        raise InvalidInput("manifest is signed by another key than the trusted coordinator key")
    try:
        public = ed25519_public(base64.b64decode(signer, validate=True))
        public.verify(base64.b64decode(str(sig.get("value", "")), validate=True), canonical(manifest))
    except (ValueError, InvalidSignature) as e:
        raise InvalidInput("manifest signature does not verify: fedtune.json was altered or not signed by "
                           "the coordinator") from e
    return signer
