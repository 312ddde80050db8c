"""The client's side of secure aggregation: one SecAgg+ session per round attempt.

After local training the delta is clipped, weighted and encoded in fixed point, a key advert is
signed and sent; each later step the coordinator relays (neighbours' adverts, shares addressed to
this client, the unmask request) is answered from the session. A restarted agent has lost its
session and simply counts as a dropout for that attempt, which the protocol tolerates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.secagg import ClientSession, EncryptedShare, SecAggParams, UnmaskRequest, encode
from fedtune.secagg.adapter_vector import flatten
from fedtune.secagg.adverts import verify_advert

log = logging.getLogger(__name__)


@dataclass
class _Attempt:
    task: pb.Task
    session: ClientSession
    vector: np.ndarray
    metrics: dict[str, float]
    answered: set[int] = field(default_factory=set)


class SecureParticipant:
    """Holds this client's secure-aggregation sessions, keyed by (job, round, attempt)."""

    def __init__(self, sign_key: Ed25519PrivateKey) -> None:
        self.sign_key = sign_key
        self._attempts: dict[tuple[str, int, int], _Attempt] = {}

    def begin(self, task: pb.Task, delta: dict[str, torch.Tensor], num_examples: int, dp: bool,
              metrics: dict[str, float]) -> pb.SecAggMessage:
        """Encodes the delta and returns the signed key advert to send."""
        params = SecAggParams.from_bytes(task.secagg.params)
        # Under DP every client weighs the same (the sensitivity bound needs it); otherwise by examples.
        weight = 1.0 if dp else min(num_examples, task.secagg.weight_cap) / task.secagg.weight_cap
        vector = encode(flatten(delta, weight, params.clip), params.clip, params.scale)
        if len(vector) != params.vector_len:
            raise InvalidInput(f"adapter has {len(vector)} elements, the round expects {params.vector_len}")
        session = ClientSession(params, task.secagg.index)
        self._attempts = {(task.job_id, task.round, task.secagg.attempt): _Attempt(task, session, vector, metrics)}
        advert = session.advertise()
        return pb.SecAggMessage(job_id=task.job_id, round=task.round, attempt=task.secagg.attempt,
                                phase=pb.ADVERTISE, payload=advert.to_bytes(),
                                signature=self.sign_key.sign(advert.signed_bytes()))

    def respond(self, step: pb.SecAggStep) -> tuple[pb.SecAggMessage | None, bytes | None, _Attempt | None]:
        """Answers one step: (message to send, masked input to upload, the attempt); Nones when
        this agent has no session for it or already answered."""
        attempt = self._attempts.get((step.job_id, step.round, step.attempt))
        if attempt is None or step.phase in attempt.answered:
            return None, None, None
        attempt.answered.add(step.phase)
        base: dict[str, Any] = {"job_id": step.job_id, "round": step.round, "attempt": step.attempt}
        if step.phase == pb.SHARE:
            adverts = {}
            for signed in step.adverts:
                advert = verify_advert(signed.advert, signed.signature, signed.sign_public_key)
                adverts[advert.client_index] = advert
            shares = attempt.session.share_keys(adverts)
            return pb.SecAggMessage(phase=pb.SHARE, shares=[s.to_bytes() for s in shares], **base), None, attempt
        if step.phase == pb.MASK:
            received = [EncryptedShare.from_bytes(raw) for raw in step.shares]
            return None, attempt.session.masked_input(attempt.vector, received).to_bytes(), attempt
        if step.phase == pb.UNMASK:
            request = UnmaskRequest.from_bytes(step.unmask_request)
            answer = attempt.session.unmask(set(request.survivors), set(request.dropped))
            return pb.SecAggMessage(phase=pb.UNMASK, payload=answer.to_bytes(), **base), None, attempt
        raise InvalidInput(f"unknown secure-aggregation phase {step.phase}")
