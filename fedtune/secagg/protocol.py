"""SecAgg+ round parameters and the messages the coordinator relays, with their byte forms.

One round runs four steps (Bell et al. 2020, on Bonawitz et al. 2017):

1. advertise: every client sends a `KeyAdvert` (two fresh X25519 public keys);
2. share keys: every client sends one `EncryptedShare` to each neighbor, holding a Shamir share of
   its self-mask seed and of its mask private key;
3. masked input: every client sends a `MaskedInput`, its fixed-point vector plus masks;
4. unmask: the coordinator sends an `UnmaskRequest` (who survived, who dropped) and each client
   answers with `UnmaskShares`, from which the coordinator removes the masks of the sum.

Messages are plain structs (big-endian integers, a 4-byte header ``b"FS" + version + kind``); parsing
never executes anything and rejects trailing or missing bytes. The sessions live in
`fedtune.secagg.client` and `fedtune.secagg.server`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from fedtune.errors import InvalidInput
from fedtune.secagg.fixedpoint import max_scale
from fedtune.secagg.graph import check_degree, neighbor_graph
from fedtune.secagg.wire import header, read_header

_KEY_ADVERT, _ENCRYPTED_SHARE, _MASKED_INPUT, _UNMASK_REQUEST, _UNMASK_SHARES = range(1, 6)
_SIGNING_DOMAIN = b"fedtune-secagg/v1 key advert\x00"
_KEY_BYTES = 32


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round must agree on; clients should refuse parameters they distrust.

    Attributes:
        n_clients: Participants, indexed 0..n_clients-1 in the coordinator's published order.
        degree: Neighbors per participant (the graph is ``degree``-regular); n_clients-1 is SecAgg.
        threshold: Shares needed to rebuild a client's secret.
        clip: Clipping bound of every element before encoding.
        scale: Fixed-point scale; at most ``max_scale(clip, n_clients)`` so the sum cannot wrap.
        vector_len: Elements per input vector.
        round_id: 16..64 bytes, unique per round; seeds the graph and binds keys and ciphertexts.
    """

    n_clients: int
    degree: int
    threshold: int
    clip: float
    scale: float
    vector_len: int
    round_id: bytes

    def __post_init__(self) -> None:
        check_degree(self.n_clients, self.degree)
        if self.threshold > self.degree:
            raise InvalidInput(
                f"threshold={self.threshold} is above degree={self.degree}: nothing could be rebuilt"
            )
        # Each neighbor answers for a client with either its self-mask share (it survived) or its
        # mask-key share (it dropped), never both. With 2 * threshold > degree no split of the
        # neighbors, however the server lies about who dropped, yields threshold shares of both, so
        # the server can never strip all masks off one client's input.
        if self.threshold <= self.degree // 2:
            raise InvalidInput(f"threshold={self.threshold} must be above degree // 2 = {self.degree // 2}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidInput(f"clip must be a positive finite number, got {self.clip}")
        limit = max_scale(self.clip, self.n_clients)
        if not (math.isfinite(self.scale) and 0 < self.scale <= limit):
            raise InvalidInput(
                f"scale={self.scale} must be in (0, {limit}] for clip={self.clip}, n_clients={self.n_clients}"
            )
        if not 1 <= self.vector_len < 2**31:
            raise InvalidInput(f"vector_len must be in [1, 2^31), got {self.vector_len}")
        if not (isinstance(self.round_id, bytes) and 16 <= len(self.round_id) <= 64):
            raise InvalidInput("round_id must be 16 to 64 bytes")

    @cached_property
    def graph(self) -> tuple[frozenset[int], ...]:
        """Neighbor sets, seeded by the round id (see `fedtune.secagg.graph`)."""
        return neighbor_graph(self.n_clients, self.degree, self.round_id)

    def to_bytes(self) -> bytes:
        """Canonical JSON, for the coordinator to hand the parameters to clients."""
        fields = {
            k: getattr(self, k) for k in ("n_clients", "degree", "threshold", "clip", "scale", "vector_len")
        }
        return json.dumps({**fields, "round_id": self.round_id.hex()}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggParams:
        """Parses and validates `to_bytes` output.

        Raises:
            InvalidInput: If the JSON is malformed or a value is out of range.
        """
        try:
            raw = json.loads(data)
            return cls(
                int(raw["n_clients"]),
                int(raw["degree"]),
                int(raw["threshold"]),
                float(raw["clip"]),
                float(raw["scale"]),
                int(raw["vector_len"]),
                bytes.fromhex(raw["round_id"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"malformed secagg parameters: {e}") from e


@dataclass(frozen=True)
class KeyAdvert:
    """A client's two public keys for one round: ``c_pk`` encrypts shares, ``s_pk`` derives masks.

    The integrator signs `signed_bytes` with the client's long-term Ed25519 key and every receiver
    checks the signature against the key of the client at ``client_index`` before use.
    """

    client_index: int
    c_pk: bytes
    s_pk: bytes
    round_id: bytes

    def __post_init__(self) -> None:
        if self.client_index < 0 or len(self.c_pk) != _KEY_BYTES or len(self.s_pk) != _KEY_BYTES:
            raise InvalidInput(f"key advert of client {self.client_index} is malformed")
        if not 1 <= len(self.round_id) <= 255:
            raise InvalidInput("key advert round_id must be 1 to 255 bytes")

    def signed_bytes(self) -> bytes:
        """The bytes to sign: a domain label plus `to_bytes`, so the round id is signed too."""
        return _SIGNING_DOMAIN + self.to_bytes()

    def to_bytes(self) -> bytes:
        """Wire form."""
        return (
            header(_KEY_ADVERT)
            + struct.pack(">B", len(self.round_id))
            + self.round_id
            + struct.pack(">I", self.client_index)
            + self.c_pk
            + self.s_pk
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvert:
        """Parses `to_bytes` output; raises InvalidInput if malformed."""
        r = read_header(data, _KEY_ADVERT, "key advert")
        round_id = r.take(r.u8())
        advert = cls(r.u32(), r.take(_KEY_BYTES), r.take(_KEY_BYTES), round_id)
        r.done()
        return advert


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of ``sender``'s secrets for ``receiver``, AES-256-GCM encrypted (nonce + ct + tag)."""

    sender: int
    receiver: int
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        """Wire form."""
        return (
            header(_ENCRYPTED_SHARE)
            + struct.pack(">III", self.sender, self.receiver, len(self.ciphertext))
            + self.ciphertext
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShare:
        """Parses `to_bytes` output; raises InvalidInput if malformed."""
        r = read_header(data, _ENCRYPTED_SHARE, "encrypted share")
        sender, receiver = r.u32(), r.u32()
        share = cls(sender, receiver, r.take(r.u32()))
        r.done()
        return share


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A client's masked vector, and the neighbors whose pairwise masks it holds.

    ``peers`` lets the server refuse an input masked against a different set of neighbors than the
    one it will unmask (a lost share would otherwise give a wrong sum instead of an error).
    """

    sender: int
    peers: frozenset[int]
    vector: np.ndarray = field(repr=False)

    def to_bytes(self) -> bytes:
        """Wire form; the vector travels as little-endian uint32."""
        peers = sorted(self.peers)
        return (
            header(_MASKED_INPUT)
            + struct.pack(f">II{len(peers)}I", self.sender, len(peers), *peers)
            + struct.pack(">I", len(self.vector))
            + np.asarray(self.vector, dtype="<u4").tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        """Parses `to_bytes` output; raises InvalidInput if malformed."""
        r = read_header(data, _MASKED_INPUT, "masked input")
        sender = r.u32()
        peers = frozenset(r.u32() for _ in range(r.u32()))
        length = r.u32()
        vector = np.frombuffer(r.take(4 * length), dtype="<u4").astype(np.uint32)
        r.done()
        return cls(sender, peers, vector)


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's verdict: whose inputs it holds (survivors) and who shared keys but sent none."""

    survivors: frozenset[int]
    dropped: frozenset[int]

    def to_bytes(self) -> bytes:
        """Wire form."""
        s, d = sorted(self.survivors), sorted(self.dropped)
        return header(_UNMASK_REQUEST) + struct.pack(f">I{len(s)}II{len(d)}I", len(s), *s, len(d), *d)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parses `to_bytes` output; raises InvalidInput if malformed."""
        r = read_header(data, _UNMASK_REQUEST, "unmask request")
        survivors = frozenset(r.u32() for _ in range(r.u32()))
        dropped = frozenset(r.u32() for _ in range(r.u32()))
        r.done()
        return cls(survivors, dropped)


@dataclass(frozen=True)
class UnmaskShares:
    """A client's answer: self-mask shares of survivors, mask-key shares of dropped neighbors.

    Keys are the index of the client the share belongs to; the share's Shamir x is ``sender + 1``.
    """

    sender: int
    b_shares: dict[int, bytes]
    sk_shares: dict[int, bytes]

    def to_bytes(self) -> bytes:
        """Wire form."""
        parts = [header(_UNMASK_SHARES), struct.pack(">I", self.sender)]
        for shares in (self.b_shares, self.sk_shares):
            parts.append(struct.pack(">I", len(shares)))
            for owner in sorted(shares):
                parts.append(struct.pack(">IH", owner, len(shares[owner])) + shares[owner])
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskShares:
        """Parses `to_bytes` output; raises InvalidInput if malformed or an owner repeats."""
        r = read_header(data, _UNMASK_SHARES, "unmask shares")
        sender = r.u32()
        tables: list[dict[int, bytes]] = []
        for _ in range(2):
            table: dict[int, bytes] = {}
            for _ in range(r.u32()):
                owner = r.u32()
                if owner in table:
                    raise InvalidInput(f"unmask shares from client {sender} repeat client {owner}")
                table[owner] = r.take(r.u16())
            tables.append(table)
        r.done()
        return cls(sender, tables[0], tables[1])
