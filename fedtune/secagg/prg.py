"""Mask expansion and key agreement.

`expand` stretches a 32-byte seed into a uint32 mask with AES-256-CTR (AES-NI makes a 1 MiB mask
cost well under a millisecond). `agree` turns an X25519 exchange into a 32-byte seed or key with
HKDF-SHA256, bound to the round and, for pairwise values, to the unordered pair of clients, so both
ends derive the same bytes and no two rounds or pairs share one.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.errors import InvalidInput

SEED_BYTES = 32
KEY_BYTES = 32
# Labels keep the share-encryption keys and the mask seeds of one key exchange independent.
MASK_LABEL = b"mask"
SHARE_LABEL = b"share"
_DOMAIN = b"fedtune-secagg/v1|"
_ZERO_NONCE = bytes(16)


def expand(seed: bytes, length: int) -> np.ndarray:
    """Expands a seed into ``length`` pseudo-random uint32 values, deterministically.

    A zero nonce is safe because every seed is used for exactly one mask: self-mask seeds are fresh
    random bytes and pairwise seeds are HKDF outputs bound to the round and the pair.

    Args:
        seed: 32 bytes, used as the AES-256 key.
        length: Number of uint32 values.

    Returns:
        A uint32 numpy vector (little-endian interpretation of the keystream, on every platform).

    Raises:
        InvalidInput: If the seed is not 32 bytes or the length is negative.
    """
    if len(seed) != SEED_BYTES:
        raise InvalidInput(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise InvalidInput(f"mask length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key from OS entropy."""
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key that belongs to ``private``."""
    return private.public_key().public_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Loads a 32-byte raw X25519 private key (as rebuilt from Shamir shares).

    Raises:
        InvalidInput: If the bytes are not a private key.
    """
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as e:
        raise InvalidInput(f"not an X25519 private key ({len(raw)} bytes)") from e


def agree(
    private: X25519PrivateKey, peer_public: bytes, label: bytes, round_id: bytes, pair: tuple[int, int]
) -> bytes:
    """Derives a 32-byte value shared by the two ends of an X25519 exchange.

    Args:
        private: This side's private key.
        peer_public: The other side's raw 32-byte public key.
        label: `MASK_LABEL` or `SHARE_LABEL`, so one exchange yields independent values per use.
        round_id: The round both sides are in.
        pair: The two client indices, in any order (sorted here so both ends agree).

    Returns:
        32 bytes from HKDF-SHA256 over the shared secret.

    Raises:
        InvalidInput: If the peer's public key is malformed or of low order.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise InvalidInput(f"peer public key is not a usable X25519 key ({len(peer_public)} bytes)") from e
    low, high = sorted(pair)
    info = _DOMAIN + label + b"|" + round_id + struct.pack(">II", low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)
