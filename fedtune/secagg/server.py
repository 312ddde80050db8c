"""The coordinator side of one SecAgg+ round: collects, routes, and unmasks only the sum.

Each phase closes when the next one is first used: `adverts_for` closes key adverts, `shares_for`
closes key sharing, `unmask_request` closes masked inputs. Late messages for a closed phase are
refused, so every client sees the same sets and the masks in the inputs match the ones removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from fedtune.errors import InvalidInput, PreconditionFailed
from fedtune.secagg.protocol import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SecAggParams,
    UnmaskRequest,
    UnmaskShares,
)
from fedtune.secagg.unmask import remove_masks

logger = logging.getLogger(__name__)

# Honest ciphertexts are about 170 bytes; anything far larger is not a share.
_MAX_CIPHERTEXT = 1024


class ServerSession:
    """The coordinator's state for one round; it only ever sees masked vectors.

    Args:
        params: The round's parameters, the same the clients were given.
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._phase = "advertise"
        self._adverts: dict[int, KeyAdvert] = {}
        self._shares: dict[int, list[EncryptedShare]] = {}  # sender -> its shares
        # Inputs are summed on arrival: memory stays at one vector however many clients there are.
        self._total = np.zeros(params.vector_len, dtype=np.uint32)
        self._mask_peers: dict[int, frozenset[int]] = {}  # survivor -> neighbors it masked against
        self._request: UnmaskRequest | None = None
        self._answers: dict[int, UnmaskShares] = {}

    def add_advert(self, advert: KeyAdvert) -> None:
        """Records a client's (signature-checked) key advert.

        Raises:
            InvalidInput: If the advert is for an unknown client or another round, or conflicts.
            PreconditionFailed: If adverts are closed.
        """
        self._require("advertise")
        i = self._known(advert.client_index, "key advert")
        if advert.round_id != self.params.round_id:
            raise InvalidInput(f"key advert of client {i} is for another round")
        if self._adverts.get(i, advert) != advert:
            raise InvalidInput(f"client {i} advertised two different key pairs")
        self._adverts[i] = advert

    def adverts_for(self, index: int) -> dict[int, KeyAdvert]:
        """The adverts of ``index``'s neighbors; the first call closes adverts.

        Raises:
            PreconditionFailed: If ``index`` did not advertise or key sharing is already closed.
        """
        if self._phase == "advertise":
            self._phase = "share_keys"
            logger.debug("secagg adverts closed: %d of %d clients", len(self._adverts), self.params.n_clients)
        self._require("share_keys")
        if self._known(index, "advert request") not in self._adverts:
            raise PreconditionFailed(f"client {index} did not advertise keys in time")
        return {j: self._adverts[j] for j in sorted(self.params.graph[index]) if j in self._adverts}

    def add_shares(self, sender: int, shares: Iterable[EncryptedShare]) -> None:
        """Records one client's encrypted shares, one for each neighbor that advertised.

        Raises:
            InvalidInput: If a share is for an unknown client or a non-neighbor, or one is missing.
            PreconditionFailed: If the sender did not advertise or key sharing is closed.
        """
        self._require("share_keys")
        if self._known(sender, "shares") not in self._adverts:
            raise PreconditionFailed(f"client {sender} sent shares without having advertised keys")
        if sender in self._shares:
            raise InvalidInput(f"client {sender} sent its shares twice")
        shares = list(shares)
        expected = {j for j in self.params.graph[sender] if j in self._adverts}
        got = [s.receiver for s in shares]
        for s in shares:
            if s.sender != sender:
                raise InvalidInput(f"client {sender} sent a share in the name of client {s.sender}")
            self._known(s.receiver, f"share from client {sender}")
            if len(s.ciphertext) > _MAX_CIPHERTEXT:
                raise InvalidInput(
                    f"share from client {sender} is {len(s.ciphertext)} bytes, over {_MAX_CIPHERTEXT}"
                )
        if len(got) != len(set(got)) or set(got) != expected:
            raise InvalidInput(
                f"client {sender} sent shares for {sorted(got)}, expected its neighbors {sorted(expected)}"
            )
        self._shares[sender] = shares

    def shares_for(self, receiver: int) -> list[EncryptedShare]:
        """The shares addressed to ``receiver``; the first call closes key sharing.

        Raises:
            PreconditionFailed: If ``receiver`` did not share its keys or the phase is wrong.
        """
        if self._phase == "share_keys":
            self._phase = "masked_input"
            logger.debug("secagg key sharing closed: %d clients", len(self._shares))
        self._require("masked_input")
        if self._known(receiver, "share request") not in self._shares:
            raise PreconditionFailed(f"client {receiver} did not share its keys in time")
        return [
            s
            for j in sorted(self.params.graph[receiver])
            if j in self._shares
            for s in self._shares[j]
            if s.receiver == receiver
        ]

    def add_masked_input(self, masked: MaskedInput) -> None:
        """Records a client's masked vector after checking its shape and its masks.

        Raises:
            InvalidInput: If the vector has the wrong type or length, or was masked against other peers.
            PreconditionFailed: If the sender did not share keys, or inputs are closed.
        """
        self._require("masked_input")
        i = self._known(masked.sender, "masked input")
        if i not in self._shares:
            raise PreconditionFailed(f"client {i} sent a masked input without having shared its keys")
        if i in self._mask_peers:
            raise InvalidInput(f"client {i} sent two masked inputs")
        v = masked.vector
        if not (isinstance(v, np.ndarray) and v.dtype == np.uint32 and v.ndim == 1):
            raise InvalidInput(f"masked vector of client {i} must be a 1-D uint32 array")
        if len(v) != self.params.vector_len:
            raise InvalidInput(
                f"masked vector of client {i} has length {len(v)}, expected {self.params.vector_len}"
            )
        expected = {j for j in self.params.graph[i] if j in self._shares}
        if masked.peers != expected:
            raise InvalidInput(
                f"client {i} masked against {sorted(masked.peers)}, expected {sorted(expected)}"
            )
        np.add(self._total, v, out=self._total)
        self._mask_peers[i] = masked.peers

    def unmask_request(self) -> UnmaskRequest:
        """Who survived and who dropped; the first call closes inputs. Send it to every survivor.

        Raises:
            PreconditionFailed: If fewer than ``threshold`` clients sent masked inputs.
        """
        if self._phase == "masked_input":
            self._phase = "unmask"
            survivors = frozenset(self._mask_peers)
            self._request = UnmaskRequest(survivors, frozenset(self._shares) - survivors)
            logger.debug(
                "secagg inputs closed: %d survivors, %d dropped", len(survivors), len(self._request.dropped)
            )
        self._require("unmask")
        assert self._request is not None
        if len(self._request.survivors) < self.params.threshold:
            raise PreconditionFailed(
                f"too many clients dropped: {len(self._request.survivors)} masked inputs "
                f"arrived, {self.params.threshold} needed"
            )
        return self._request

    def add_unmask(self, answer: UnmaskShares) -> None:
        """Records a survivor's unmask shares after checking they are the ones it was asked for.

        Raises:
            InvalidInput: If a share is for an unknown client, a non-neighbor, or the wrong kind.
            PreconditionFailed: If the sender is not a survivor or unmasking has not started.
        """
        self._require("unmask")
        request = self.unmask_request()
        i = self._known(answer.sender, "unmask shares")
        if i not in request.survivors:
            raise PreconditionFailed(f"client {i} sent unmask shares but is not a survivor")
        if i in self._answers:
            raise InvalidInput(f"client {i} sent unmask shares twice")
        for owners, allowed, kind in (
            (answer.b_shares, request.survivors, "self-mask"),
            (answer.sk_shares, request.dropped, "mask-key"),
        ):
            for j, share in owners.items():
                self._known(j, f"{kind} share from client {i}")
                if j not in self.params.graph[i] or j not in allowed:
                    raise InvalidInput(
                        f"client {i} sent a {kind} share of client {j}, which it was not asked for"
                    )
                if len(share) > _MAX_CIPHERTEXT:
                    raise InvalidInput(f"{kind} share of client {j} from client {i} is {len(share)} bytes")
        self._answers[i] = answer

    def aggregate(self) -> np.ndarray:
        """The sum mod 2^32 of the survivors' fixed-point inputs, with every mask removed.

        Raises:
            PreconditionFailed: If unmasking has not started, or too many clients dropped for some
                secret to be rebuilt (the message names it and the shares available vs needed).
            InvalidInput: If shares rebuild a mask key that does not match its advert.
        """
        request = self.unmask_request()
        return remove_masks(self.params, self._adverts, self._total, self._mask_peers, request, self._answers)

    @property
    def phase(self) -> str:
        """The open phase: advertise, share_keys, masked_input or unmask."""
        return self._phase

    def _require(self, phase: str) -> None:
        if self._phase != phase:
            raise PreconditionFailed(f"secagg round is in phase {self._phase!r}, not {phase!r}")

    def _known(self, index: int, what: str) -> int:
        if not 0 <= index < self.params.n_clients:
            raise InvalidInput(
                f"{what} names unknown client {index} (participants are 0..{self.params.n_clients - 1})"
            )
        return index
