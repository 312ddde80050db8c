"""Drives one job's rounds through SecAgg+ (fedtune.secagg): advertise -> share -> mask -> unmask.

Every message is stored before it is acknowledged, and what each participant is sent in a phase
is stored with the phase change, so a restarted coordinator rebuilds the exact server session
by replaying them in order. The server session is only ever touched here, by the engine thread.
A round whose sum cannot be recovered is abandoned and reopened (up to max_attempts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import numpy as np

from fedtune.coordinator.keyring import KeyRing
from fedtune.coordinator.state import CoordinatorState, SecAggRound
from fedtune.coordinator.store import ArtifactStore
from fedtune.crypto.envelope import UpdateBinding
from fedtune.errors import FedtuneError, PreconditionFailed
from fedtune.protos import fedtune_pb2 as pb
from fedtune.secagg import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SecAggParams,
    ServerSession,
    UnmaskShares,
    decode_sum,
    max_scale,
)
from fedtune.secagg.adapter_vector import vector_len
from fedtune.spec import JobSpec

log = logging.getLogger(__name__)

PHASES = ("advertise", "share", "mask", "unmask")


class RoundAbandoned(FedtuneError):
    """Too few participants or too many dropouts: this attempt's sum cannot be recovered."""


def _indices(members: tuple[str, ...]) -> dict[str, int]:
    return {c: i for i, c in enumerate(members)}


class SecureRound:
    """SecAgg+ phases of a job's rounds."""

    def __init__(self, job_id: str, spec: JobSpec, state: CoordinatorState, store: ArtifactStore, keys: KeyRing,
                 schema: dict[str, tuple[int, ...]]) -> None:
        assert spec.secure_aggregation is not None
        self.job_id = job_id
        self.spec = spec
        self.sa = spec.secure_aggregation
        self.state = state
        self.store = store
        self.keys = keys
        self.schema = schema

    def start(self, rnd: int, cohort: list[str]) -> SecAggRound:
        """Fixes the parameters of a new attempt at round ``rnd`` over ``cohort`` (index = position)."""
        n = len(cohort)
        round_id = hashlib.sha256(b"fedtune-secagg" + self.job_id.encode() + rnd.to_bytes(4, "big")
                                  + os.urandom(16)).digest()
        degree, threshold = self.sa.graph_for(n)
        params = SecAggParams(n_clients=n, degree=degree, threshold=threshold, clip=self.sa.clip,
                              scale=max_scale(self.sa.clip, n), vector_len=vector_len(self.schema), round_id=round_id)
        deadline = time.time() + self.spec.round_deadline_seconds
        return self.state.start_secagg(self.job_id, rnd, params.to_bytes(), cohort, deadline)

    # ------------------------------------------------------------------ the engine's step
    def tick(self, sec: SecAggRound) -> bool:
        """Advances the attempt when its phase is complete or past its deadline.

        Returns:
            True once unmasking is complete and :meth:`aggregate` can run.

        Raises:
            RoundAbandoned: the attempt cannot produce a sum.
        """
        now = time.time()
        expected, got = self._progress(sec)
        if not (expected <= got or now >= sec.deadline):
            return False
        count = len(got & expected)
        threshold = SecAggParams.from_bytes(sec.params).threshold
        need = max(self.spec.min_clients if sec.phase == "advertise" else threshold, threshold)
        if count < need:
            raise RoundAbandoned(f"{sec.phase} phase ended with {count} participants, {need} needed")
        if sec.phase == "unmask":
            return True
        nxt = PHASES[PHASES.index(sec.phase) + 1]
        try:
            outbox = self._outbox(sec, self._replay(sec), nxt)
        except PreconditionFailed as e:
            raise RoundAbandoned(str(e)) from e
        if len(outbox) < threshold:
            raise RoundAbandoned(f"only {len(outbox)} participants can take part in the {nxt} phase, "
                                 f"{threshold} needed")
        self.state.set_secagg_phase(self.job_id, sec.round, nxt, now + self.sa.phase_seconds, outbox)
        log.info("job %s round %d attempt %d: %s -> %s (%d participants)", self.job_id, sec.round, sec.attempt,
                 sec.phase, nxt, len(outbox))
        return False

    def aggregate(self, sec: SecAggRound) -> tuple[np.ndarray, float, int]:
        """The unmasked, decoded sum (float64, the layout of :mod:`fedtune.secagg.adapter_vector`),
        the round's clip, and the number of contributors.

        Raises:
            RoundAbandoned: too many dropped to rebuild the masks (refused, never a wrong sum).
        """
        session = self._replay(sec)
        try:
            total = session.aggregate()
        except PreconditionFailed as e:
            raise RoundAbandoned(str(e)) from e
        params = SecAggParams.from_bytes(sec.params)
        contributors = len(self._senders(sec, "mask"))
        return decode_sum(total, params.scale), params.clip, contributors

    # ------------------------------------------------------------------ progress
    def _senders(self, sec: SecAggRound, phase: str) -> set[int]:
        if phase == "mask":
            idx = _indices(sec.members)
            return {idx[u.client_id] for u in self.state.updates(self.job_id, sec.round) if u.client_id in idx}
        return {s for s, _, _ in self.state.secagg_messages(self.job_id, sec.round, sec.attempt, phase)}

    def _progress(self, sec: SecAggRound) -> tuple[set[int], set[int]]:
        """(who is expected to answer this phase, who did)."""
        if sec.phase == "advertise":
            expected = set(range(len(sec.members)))
        else:
            expected = {i for i in range(len(sec.members))
                        if self.state.secagg_outbox(self.job_id, sec.round, sec.attempt, sec.phase, i) is not None}
        return expected, self._senders(sec, sec.phase)

    # ------------------------------------------------------------------ the server session
    def _replay(self, sec: SecAggRound) -> ServerSession:
        """The server session of this attempt, rebuilt from its stored messages in their order.

        Rebuilt at each phase change rather than kept in memory, so that a restarted coordinator
        and a running one take exactly the same path.
        """
        session = ServerSession(SecAggParams.from_bytes(sec.params))
        upto = PHASES.index(sec.phase)
        members = sec.members
        for phase in PHASES[: upto + 1]:
            if phase == "share":
                for i in self._recipients(sec, "share"):
                    session.adverts_for(i)
            elif phase == "mask":
                for i in self._recipients(sec, "mask"):
                    session.shares_for(i)
            elif phase == "unmask":
                session.unmask_request()
            self._feed(session, sec, phase, members)
        return session

    def _recipients(self, sec: SecAggRound, phase: str) -> list[int]:
        return [i for i in range(len(sec.members))
                if self.state.secagg_outbox(self.job_id, sec.round, sec.attempt, phase, i) is not None]

    def _feed(self, session: ServerSession, sec: SecAggRound, phase: str, members: tuple[str, ...]) -> None:
        """Adds a phase's stored messages; one that the session refuses makes its sender a dropout."""
        if phase == "mask":
            idx = _indices(members)
            for u in sorted(self.state.updates(self.job_id, sec.round), key=lambda u: idx.get(u.client_id, -1)):
                binding = UpdateBinding(u.job_id, u.round, u.client_id, u.update_id)
                self._try(session.add_masked_input, lambda u=u, b=binding: MaskedInput.from_bytes(
                    self.keys.open_update(self.store.read(u.sha256), b)), u.client_id)
            return
        for sender, payload, signature in self.state.secagg_messages(self.job_id, sec.round, sec.attempt, phase):
            if phase == "advertise":
                self._try(session.add_advert, lambda p=payload: KeyAdvert.from_bytes(p), members[sender])
            elif phase == "share":
                shares = [EncryptedShare.from_bytes(s) for s in _split(payload)]
                self._try(lambda s, i=sender: session.add_shares(i, s), lambda s=shares: s, members[sender])
            elif phase == "unmask":
                self._try(session.add_unmask, lambda p=payload: UnmaskShares.from_bytes(p), members[sender])
            del signature

    def _try(self, add, parse, who: str) -> None:  # type: ignore[no-untyped-def]
        try:
            add(parse())
        except FedtuneError as e:
            log.warning("job %s: secure-aggregation message from %s refused (treated as a dropout): %s",
                        self.job_id, who, e)

    def _outbox(self, sec: SecAggRound, session: ServerSession, phase: str) -> dict[int, bytes]:
        """What each participant of the next phase is sent, as serialized SecAggStep messages."""
        step: dict[str, Any] = {"job_id": self.job_id, "round": sec.round, "attempt": sec.attempt}
        out: dict[int, bytes] = {}
        if phase == "share":
            signed = {s: sig for s, _, sig in self.state.secagg_messages(self.job_id, sec.round, sec.attempt,
                                                                         "advertise")}
            keys = {c.client_id: c.sign_public_key for c in self.state.clients(self.job_id)}
            for i in sorted(signed):
                try:
                    neighbours = session.adverts_for(i)
                except PreconditionFailed:
                    continue  # its advert was refused: a dropout
                adverts = [pb.SignedAdvert(advert=a.to_bytes(), signature=signed[j],
                                           sign_public_key=keys[sec.members[j]])
                           for j, a in sorted(neighbours.items())]
                out[i] = pb.SecAggStep(phase=pb.SHARE, adverts=adverts, **step).SerializeToString()
        elif phase == "mask":
            for i in sorted(self._senders(sec, "share")):
                try:
                    shares = [s.to_bytes() for s in session.shares_for(i)]
                except PreconditionFailed:
                    continue
                out[i] = pb.SecAggStep(phase=pb.MASK, shares=shares, **step).SerializeToString()
        elif phase == "unmask":
            request = session.unmask_request()
            for i in sorted(request.survivors):
                out[i] = pb.SecAggStep(phase=pb.UNMASK, unmask_request=request.to_bytes(),
                                       **step).SerializeToString()
        return out


def join_shares(shares: list[bytes]) -> bytes:
    """Stores a list of shares as one blob: 4-byte big-endian length before each."""
    return b"".join(len(s).to_bytes(4, "big") + s for s in shares)


def _split(blob: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(blob):
        n = int.from_bytes(blob[off:off + 4], "big")
        out.append(blob[off + 4: off + 4 + n])
        off += 4 + n
    return out
