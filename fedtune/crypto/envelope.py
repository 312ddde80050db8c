"""Envelope encryption of client updates, end to end to the coordinator's per-job key.

An envelope is ``ephemeral X25519 public key (32) || nonce (12) || AES-256-GCM ciphertext+tag``:
60 bytes over the payload. The AES key is HKDF-SHA256 of the X25519 shared secret between a
fresh ephemeral client key and the job's key, with both public keys in the HKDF info, so each
update has its own key. The associated data binds job, round, client and update id: an envelope
replayed into another round, job, client or update, reordered or altered in any byte, fails
authentication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.errors import InvalidInput

SCHEME = "x25519-hkdf-sha256-aes256gcm/v1"
_PK = 32
_NONCE = 12
_TAG = 16
OVERHEAD = _PK + _NONCE + _TAG


@dataclass(frozen=True)
class UpdateBinding:
    """What an envelope is bound to; any difference on opening fails authentication."""

    job_id: str
    round: int
    client_id: str
    update_id: str

    def associated_data(self) -> bytes:
        """Canonical associated data (fields are length-prefixed, so none can bleed into another)."""
        parts = [SCHEME, self.job_id, str(self.round), self.client_id, self.update_id]
        return b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts)


def raw_public(key: X25519PublicKey) -> bytes:
    """32 raw bytes of an X25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, eph_pk: bytes, job_pk: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedtune/v1 update" + eph_pk + job_pk).derive(shared)


def seal(payload: bytes, job_public_key: bytes, binding: UpdateBinding) -> bytes:
    """Encrypts ``payload`` to the job's X25519 public key."""
    try:
        job_pk = X25519PublicKey.from_public_bytes(job_public_key)
    except ValueError as e:
        raise InvalidInput(f"job public key is not an X25519 key: {e}") from e
    eph = X25519PrivateKey.generate()
    eph_pk = raw_public(eph.public_key())
    key = _key(eph.exchange(job_pk), eph_pk, job_public_key)
    nonce = os.urandom(_NONCE)
    return eph_pk + nonce + AESGCM(key).encrypt(nonce, payload, binding.associated_data())


def open_envelope(envelope: bytes, job_key: X25519PrivateKey, binding: UpdateBinding) -> bytes:
    """Decrypts an envelope made by :func:`seal` for ``binding``.

    Raises:
        InvalidInput: the envelope is malformed or fails authentication (tampered, replayed into
            another job, round, client or update).
    """
    if len(envelope) < OVERHEAD:
        raise InvalidInput(f"update envelope of {len(envelope)} bytes is shorter than its {OVERHEAD}-byte overhead")
    eph_pk, nonce, body = envelope[:_PK], envelope[_PK:_PK + _NONCE], envelope[_PK + _NONCE:]
    try:
        shared = job_key.exchange(X25519PublicKey.from_public_bytes(eph_pk))
        key = _key(shared, eph_pk, raw_public(job_key.public_key()))
        return AESGCM(key).decrypt(nonce, body, binding.associated_data())
    except (InvalidTag, ValueError) as e:
        raise InvalidInput("update envelope failed authentication (tampered, replayed or for another "
                           "job, round, client or update)") from e
