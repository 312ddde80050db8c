"""Shamir secret sharing of byte strings over the prime field GF(2^521 - 1).

The secret is cut into 64-byte chunks; each chunk is an integer below 2^512 < p and gets its own
random polynomial of degree ``threshold - 1``, evaluated at every share's x. A share is a 2-byte
secret length followed by one 66-byte field element per chunk, so a 32-byte key gives 68-byte
shares. Any ``threshold`` shares rebuild the secret; fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence

from fedtune.errors import InvalidInput, PreconditionFailed

# A Mersenne prime: well known to be prime, and large enough for 64-byte chunks.
PRIME = 2**521 - 1
_ELEMENT_BYTES = 66
_CHUNK_BYTES = 64
_MAX_SECRET = 0xFFFF


def split(
    secret: bytes, n_shares: int, threshold: int, *, xs: Sequence[int] | None = None
) -> list[tuple[int, bytes]]:
    """Splits a secret into shares, any ``threshold`` of which rebuild it.

    Args:
        secret: The bytes to share (at most 65535).
        n_shares: How many shares to make.
        threshold: How many shares `combine` needs, 1 <= threshold <= n_shares.
        xs: The evaluation points, distinct and in [1, p); defaults to 1..n_shares. The protocol
            uses ``holder index + 1`` so a share's x follows from who returns it.

    Returns:
        ``(x, share_bytes)`` pairs, one per share.

    Raises:
        InvalidInput: If the counts, the points or the secret's length are out of range.
    """
    if not 1 <= threshold <= n_shares:
        raise InvalidInput(f"threshold must be in [1, n_shares={n_shares}], got {threshold}")
    if len(secret) > _MAX_SECRET:
        raise InvalidInput(f"secret of {len(secret)} bytes is over the {_MAX_SECRET}-byte limit")
    points = list(range(1, n_shares + 1)) if xs is None else list(xs)
    if len(points) != n_shares or len(set(points)) != n_shares:
        raise InvalidInput(f"need {n_shares} distinct share points, got {points}")
    if any(not 0 < x < PRIME for x in points):
        raise InvalidInput("share points must lie in [1, p)")
    chunks = [secret[i : i + _CHUNK_BYTES] for i in range(0, len(secret), _CHUNK_BYTES)]
    shares: list[list[bytes]] = [[struct.pack(">H", len(secret))] for _ in points]
    for chunk in chunks:
        coeffs = [int.from_bytes(chunk, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for out, x in zip(shares, points):
            y = 0
            for c in reversed(coeffs):  # Horner
                y = (y * x + c) % PRIME
            out.append(y.to_bytes(_ELEMENT_BYTES, "big"))
    return [(x, b"".join(parts)) for x, parts in zip(points, shares)]


def combine(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """Rebuilds a secret from ``threshold`` (or more) of its shares.

    Args:
        shares: ``(x, share_bytes)`` pairs from `split`; only the first ``threshold`` are used.
        threshold: The threshold the secret was split with.

    Returns:
        The secret.

    Raises:
        PreconditionFailed: With fewer than ``threshold`` shares.
        InvalidInput: If shares are malformed, disagree on the secret's length, or repeat a point.
    """
    if threshold < 1:
        raise InvalidInput(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise PreconditionFailed(f"need {threshold} shares to rebuild the secret, got {len(shares)}")
    used = list(shares[:threshold])
    xs = [x for x, _ in used]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise InvalidInput(f"share points must be distinct and in [1, p), got {xs}")
    length, values = _parse(used[0][1])
    rows = [values]
    for _, share in used[1:]:
        other_length, other = _parse(share)
        if other_length != length or len(other) != len(values):
            raise InvalidInput("shares disagree on the secret's length")
        rows.append(other)
    weights = _lagrange_at_zero(xs)
    out = bytearray()
    for chunk_no in range(len(values)):
        value = sum(w * row[chunk_no] for w, row in zip(weights, rows)) % PRIME
        size = min(_CHUNK_BYTES, length - chunk_no * _CHUNK_BYTES)
        if value >= 1 << (8 * size):
            # Honest shares always rebuild a value that fits; this one came from corrupt shares.
            raise InvalidInput("shares are inconsistent: the rebuilt secret does not fit its length")
        out += value.to_bytes(size, "big")
    return bytes(out)


def _parse(share: bytes) -> tuple[int, list[int]]:
    """The secret length and the field elements of one share."""
    if len(share) < 2:
        raise InvalidInput(f"share of {len(share)} bytes is too short")
    (length,) = struct.unpack(">H", share[:2])
    n_chunks = -(-length // _CHUNK_BYTES)
    if len(share) != 2 + n_chunks * _ELEMENT_BYTES:
        raise InvalidInput(f"share of {len(share)} bytes does not match a {length}-byte secret")
    values = [
        int.from_bytes(share[2 + i * _ELEMENT_BYTES : 2 + (i + 1) * _ELEMENT_BYTES], "big")
        for i in range(n_chunks)
    ]
    if any(v >= PRIME for v in values):
        raise InvalidInput("share holds a value outside the field")
    return length, values


def _lagrange_at_zero(xs: list[int]) -> list[int]:
    """Weights w_i with f(0) = sum w_i f(x_i) for any polynomial of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return weights
