"""The client side of one SecAgg+ round: a state machine the client agent drives step by step.

Each step may run once and only in order (advertise, share_keys, masked_input, unmask); the keys and
the self-mask seed are fresh per session and never leave it except as Shamir shares.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.errors import InvalidInput, PreconditionFailed
from fedtune.secagg import prg, shamir
from fedtune.secagg.protocol import EncryptedShare, KeyAdvert, MaskedInput, SecAggParams, UnmaskShares
from fedtune.secagg.wire import Reader

_NONCE_BYTES = 12


class ClientSession:
    """One client's part in one round.

    Args:
        params: The round's parameters (validated on construction).
        index: This client's position in the round's participant order.

    Raises:
        InvalidInput: If ``index`` is not a participant.
    """

    def __init__(self, params: SecAggParams, index: int) -> None:
        if not 0 <= index < params.n_clients:
            raise InvalidInput(f"client index {index} is outside 0..{params.n_clients - 1}")
        self.params = params
        self.index = index
        self.neighbors = params.graph[index]
        self._c_sk = prg.new_private_key()
        self._s_sk = prg.new_private_key()
        self._advert = KeyAdvert(
            index, prg.public_bytes(self._c_sk), prg.public_bytes(self._s_sk), params.round_id
        )
        self._peers: dict[int, KeyAdvert] = {}
        self._b_seed: bytes | None = None
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (self-mask share, mask-key share)
        self._step = "share_keys"

    def advertise(self) -> KeyAdvert:
        """This client's public keys for the round (the same advert on every call)."""
        return self._advert

    def share_keys(self, adverts: dict[int, KeyAdvert]) -> list[EncryptedShare]:
        """Shamir-shares the self-mask seed and the mask private key among advertised neighbors.

        Args:
            adverts: Signature-checked adverts by client index; non-neighbors are ignored.

        Returns:
            One encrypted share per neighbor that advertised, for the coordinator to route.

        Raises:
            InvalidInput: If an advert is for another index or round, or a public key repeats.
            PreconditionFailed: If called out of order or fewer than ``threshold`` neighbors advertised.
        """
        self._require("share_keys")
        p = self.params
        for idx, advert in adverts.items():
            if not 0 <= idx < p.n_clients or advert.client_index != idx:
                raise InvalidInput(f"advert filed under client {idx} is for client {advert.client_index}")
            if advert.round_id != p.round_id:
                raise InvalidInput(f"advert of client {idx} is for another round")
        if self.index in adverts and adverts[self.index] != self._advert:
            raise InvalidInput(f"advert under this client's index {self.index} is not its own")
        peers = {j: adverts[j] for j in sorted(self.neighbors) if j in adverts}
        keys = [k for a in [self._advert, *peers.values()] for k in (a.c_pk, a.s_pk)]
        if len(set(keys)) != len(keys):
            raise InvalidInput("two adverts share a public key")
        if len(peers) < p.threshold:
            raise PreconditionFailed(
                f"only {len(peers)} of {p.degree} neighbors advertised keys, {p.threshold} needed"
            )
        self._b_seed = os.urandom(prg.SEED_BYTES)
        xs = [j + 1 for j in peers]
        b_shares = shamir.split(self._b_seed, len(peers), p.threshold, xs=xs)
        sk_shares = shamir.split(self._s_sk.private_bytes_raw(), len(peers), p.threshold, xs=xs)
        self._peers = peers
        out = []
        for (j, advert), (_, b_share), (_, sk_share) in zip(peers.items(), b_shares, sk_shares):
            plaintext = (
                struct.pack(">H", len(b_share)) + b_share + struct.pack(">H", len(sk_share)) + sk_share
            )
            nonce = os.urandom(_NONCE_BYTES)
            sealed = self._cipher(j, advert).encrypt(nonce, plaintext, _aad(p.round_id, self.index, j))
            out.append(EncryptedShare(self.index, j, nonce + sealed))
        self._step = "masked_input"
        return out

    def masked_input(self, vector: np.ndarray, received: Iterable[EncryptedShare]) -> MaskedInput:
        """Masks a fixed-point vector; stores the shares neighbors sent this client.

        ``y = x + PRG(b) + sum_j sign(i, j) PRG(s_ij)`` mod 2^32 over the neighbors ``j`` whose share
        arrived (they finished share_keys), with ``sign = +1`` if ``i < j`` else ``-1``, so each
        pairwise mask cancels against the neighbor's.

        Args:
            vector: uint32 vector of ``vector_len`` elements, from `fixedpoint.encode`.
            received: The shares the coordinator routed to this client.

        Returns:
            The message to send; its ``vector`` alone reveals nothing about the input.

        Raises:
            InvalidInput: If the vector is malformed, or a share is misaddressed, repeated, from a
                non-neighbor, or fails authentication.
            PreconditionFailed: If called out of order or fewer than ``threshold`` shares arrived.
        """
        self._require("masked_input")
        p = self.params
        if not (
            isinstance(vector, np.ndarray) and vector.dtype == np.uint32 and vector.shape == (p.vector_len,)
        ):
            raise InvalidInput(
                f"input must be a uint32 vector of length {p.vector_len}, got "
                f"{getattr(vector, 'dtype', type(vector))} {getattr(vector, 'shape', '')}"
            )
        held: dict[int, tuple[bytes, bytes]] = {}
        for share in received:
            held[share.sender] = self._open(share, held)
        if len(held) < p.threshold:
            raise PreconditionFailed(f"only {len(held)} neighbors shared keys, {p.threshold} needed")
        assert self._b_seed is not None  # set by share_keys, which _require guarantees ran
        y = vector + prg.expand(self._b_seed, p.vector_len)
        for j in held:
            mask = prg.expand(
                prg.agree(self._s_sk, self._peers[j].s_pk, prg.MASK_LABEL, p.round_id, (self.index, j)),
                p.vector_len,
            )
            if self.index < j:
                np.add(y, mask, out=y)
            else:
                np.subtract(y, mask, out=y)
        self._held = held
        self._b_seed = None  # only its shares are needed from here on
        self._step = "unmask"
        return MaskedInput(self.index, frozenset(held), y)

    def unmask(
        self, survivors: set[int] | frozenset[int], dropped: set[int] | frozenset[int]
    ) -> UnmaskShares:
        """Answers the coordinator's unmask request, once.

        Gives the self-mask share of every surviving neighbor and the mask-key share of every
        dropped one. Never both for one client, and only one answer per round, so the coordinator
        cannot collect both secrets of anyone.

        Raises:
            InvalidInput: If a listed index is not a participant.
            PreconditionFailed: If called out of order or twice, the sets overlap, this client is not a
                survivor, or fewer than ``threshold`` clients survived.
        """
        p = self.params
        if self._step == "done":
            # A second answer to a different request could hand over both secrets of one client.
            raise PreconditionFailed("this client already answered an unmask request this round")
        self._require("unmask")
        unknown = sorted(j for j in (*survivors, *dropped) if not 0 <= j < p.n_clients)
        if unknown:
            raise InvalidInput(f"unmask request names unknown clients {unknown}")
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise PreconditionFailed(f"unmask request lists clients {both} as both survived and dropped")
        if self.index not in survivors:
            raise PreconditionFailed(f"unmask request does not list this client {self.index} as a survivor")
        if len(survivors) < p.threshold:
            raise PreconditionFailed(f"only {len(survivors)} clients survived, {p.threshold} needed")
        self._step = "done"
        return UnmaskShares(
            self.index,
            {j: b for j, (b, _) in self._held.items() if j in survivors},
            {j: sk for j, (_, sk) in self._held.items() if j in dropped},
        )

    def _require(self, step: str) -> None:
        # A failed step leaves the session where it was: nothing secret has left it on that path.
        if self._step != step:
            raise PreconditionFailed(f"cannot run {step} now: the session is at step {self._step!r}")

    def _cipher(self, j: int, advert: KeyAdvert) -> AESGCM:
        p = self.params
        return AESGCM(prg.agree(self._c_sk, advert.c_pk, prg.SHARE_LABEL, p.round_id, (self.index, j)))

    def _open(self, share: EncryptedShare, held: dict[int, tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
        j = share.sender
        if share.receiver != self.index:
            raise InvalidInput(
                f"share from client {j} is addressed to client {share.receiver}, not {self.index}"
            )
        if j not in self._peers:
            raise InvalidInput(f"share from client {j}, which is not an advertised neighbor of {self.index}")
        if j in held:
            raise InvalidInput(f"client {j} sent two shares")
        if len(share.ciphertext) < _NONCE_BYTES + 16:
            raise InvalidInput(f"share from client {j} is too short to be a ciphertext")
        nonce, sealed = share.ciphertext[:_NONCE_BYTES], share.ciphertext[_NONCE_BYTES:]
        try:
            plaintext = self._cipher(j, self._peers[j]).decrypt(
                nonce, sealed, _aad(self.params.round_id, j, self.index)
            )
        except InvalidTag as e:
            raise InvalidInput(f"share from client {j} failed authentication") from e
        r = Reader(plaintext, f"share from client {j}")
        b_share, sk_share = r.take(r.u16()), r.take(r.u16())
        r.done()
        return b_share, sk_share


def _aad(round_id: bytes, sender: int, receiver: int) -> bytes:
    """Associated data: a share decrypts only in its round, from its sender, for its receiver."""
    return b"fedtune-secagg/v1|share|" + struct.pack(">II", sender, receiver) + round_id
