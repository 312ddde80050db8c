"""Secure aggregation over real gRPC: scripted clients run the real client-side protocol code with
known deltas, so the coordinator's unmasked aggregate can be checked against plain FedAvg."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from fedtune.client.secure import SecureParticipant
from fedtune.client.transfer import upload_messages
from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.crypto.envelope import SCHEME, UpdateBinding, seal
from fedtune.peft_io import bytes_to_tensors
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.secagg import EncryptedShare, MaskedInput, SecAggParams
from fedtune.secagg.adverts import WIRE_CODEC
from tests.conftest import Admin, make_spec, wait_until
from tests.test_rpc_contract import RawClient, _code

N = 10
SECURE = "secure_aggregation: {{degree: 8, threshold: 5, clip: 1.0, phase_seconds: {phase}, max_attempts: {attempts}}}\n"


class SecureClient(RawClient):
    """A raw client that plays the secure-aggregation protocol with a fixed delta."""

    def __init__(self, address: str, token: str, value: float, examples: int, drop_at: int | None = None) -> None:
        super().__init__(address, token)
        self.value = value
        self.examples = examples
        self.drop_at = drop_at  # a pb.SecAggPhase at which it stops answering
        self.participant = SecureParticipant(self.sign_key)

    def reconnect(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ClientServiceStub(self.channel)

    def delta(self, task: pb.Task) -> dict[str, torch.Tensor]:
        g = self.global_state(task)
        return {k: torch.full_like(v, self.value) for k, v in g.items()}

    def poll_once(self) -> None:
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id), metadata=self.md("Heartbeat"))
        if reply.action == pb.HeartbeatReply.TRAIN and self.drop_at != pb.ADVERTISE:
            task = reply.task
            msg = self.participant.begin(task, self.delta(task), self.examples, dp=False, metrics={"train_loss": 1.0})
            self.stub.SecAgg(msg, metadata=self.md("SecAgg"))
        elif reply.action == pb.HeartbeatReply.SECAGG and reply.secagg.phase != self.drop_at:
            message, masked, attempt = self.participant.respond(reply.secagg)
            if message is not None:
                self.stub.SecAgg(message, metadata=self.md("SecAgg"))
            elif masked is not None and attempt is not None:
                self.upload_masked(attempt.task, masked, reply.secagg.attempt)

    def upload_masked(self, task: pb.Task, masked: bytes, attempt: int) -> pb.UploadReply:
        update_id = f"m{task.round}.{attempt}-{self.client_id}"
        env = seal(masked, task.job_public_key, UpdateBinding(task.job_id, task.round, self.client_id, update_id))
        header = pb.UpdateHeader(job_id=task.job_id, round=task.round, task_id=task.task_id, update_id=update_id,
                                 num_examples=1, total_size=len(env), sha256=hashlib.sha256(env).hexdigest(),
                                 codec=WIRE_CODEC, envelope=SCHEME)
        return self.stub.Upload(upload_messages(header, env), metadata=self.md("Upload"))


def _federation(running: RunningCoordinator, admin: Admin, job: str, drops: dict[int, int]) -> list[SecureClient]:
    clients = [SecureClient(running.address, admin.token(job), value=0.01 * (i + 1), examples=10 * (i + 1),
                            drop_at=drops.get(i)) for i in range(N)]
    return clients


def _drive(clients: list[SecureClient], done, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    def step() -> bool:
        for c in clients:
            c.poll_once()
        return bool(done())

    wait_until(step, timeout=timeout, interval=0.05, what="the secure round")


def _published_delta(running: RunningCoordinator, job: str) -> dict[str, torch.Tensor]:
    rnd = running.coordinator.state.round(job, 1)
    store = running.coordinator.store
    new, old = bytes_to_tensors(store.read(rnd.global_out)), bytes_to_tensors(store.read(rnd.global_in))
    return {k: new[k] - old[k] for k in new}


def _expected(clients: list[SecureClient], contributing: list[int]) -> float:
    weights = [clients[i].examples for i in contributing]
    return sum(clients[i].value * w for i, w in zip(contributing, weights, strict=True)) / sum(weights)


@pytest.fixture
def secure_job(coordinator, admin: Admin):  # type: ignore[no-untyped-def]
    def make(phase: float = 3, attempts: int = 3, deadline: float = 30) -> str:
        spec = make_spec(clients=N, min_clients=9, deadline=deadline, cohort_wait=30) + SECURE.format(phase=phase, attempts=attempts)
        return admin.create_job(spec)
    return make


def test_three_clients_dropping_after_masking_still_give_the_exact_fedavg(coordinator, admin, secure_job) -> None:  # type: ignore[no-untyped-def]
    job = secure_job()
    clients = _federation(coordinator, admin, job, {7: pb.UNMASK, 8: pb.UNMASK, 9: pb.UNMASK})
    _drive(clients, lambda: coordinator.coordinator.state.job(job).state == "finished")
    delta = _published_delta(coordinator, job)
    expected = _expected(clients, list(range(N)))  # all ten sent masked inputs
    for v in delta.values():
        torch.testing.assert_close(v, torch.full_like(v, expected), atol=1e-5, rtol=0)
    assert coordinator.coordinator.state.round(job, 1).metrics["contributors"] == N


def test_clients_dropping_before_masking_are_left_out_of_the_sum(coordinator, admin, secure_job) -> None:  # type: ignore[no-untyped-def]
    job = secure_job()
    clients = _federation(coordinator, admin, job, {0: pb.MASK, 4: pb.MASK, 9: pb.MASK})
    _drive(clients, lambda: coordinator.coordinator.state.job(job).state == "finished")
    expected = _expected(clients, [1, 2, 3, 5, 6, 7, 8])
    for v in _published_delta(coordinator, job).values():
        torch.testing.assert_close(v, torch.full_like(v, expected), atol=1e-5, rtol=0)


def test_too_many_dropouts_are_refused_and_the_round_retried_then_the_job_fails(coordinator, admin, secure_job) -> None:  # type: ignore[no-untyped-def]
    job = secure_job(attempts=2)
    # Six of ten vanish after sharing keys: four survivors, fewer than the threshold of five.
    drops = dict.fromkeys(range(6), pb.MASK)
    clients = _federation(coordinator, admin, job, drops)
    state = coordinator.coordinator.state
    _drive(clients, lambda: state.job(job).state != "running", timeout=120)
    final = state.job(job)
    assert final.state == "failed"
    assert "secure aggregation failed 2 times" in final.message
    assert state.secagg_round(job, 1).attempt == 2  # type: ignore[union-attr]
    assert state.published(job) == []  # refused, never a wrong sum


def test_a_coordinator_restart_mid_protocol_resumes_the_same_attempt(tmp_path: Path) -> None:
    state_dir = tmp_path / "coord"
    running = start(state_dir, "127.0.0.1", 0, insecure=True)
    admin = Admin(running)
    job = admin.create_job(make_spec(clients=N, min_clients=9, deadline=60, cohort_wait=30) + SECURE.format(phase=20, attempts=1))
    clients = _federation(running, admin, job, {})
    state = running.coordinator.state
    _drive(clients, lambda: (s := state.secagg_round(job, 1)) is not None and s.phase == "mask")
    running.stop(grace=0.5)
    running = start(state_dir, "127.0.0.1", 0, insecure=True)
    try:
        for c in clients:
            c.reconnect(running.address)
        state = running.coordinator.state
        _drive(clients, lambda: state.job(job).state == "finished")
        assert state.secagg_round(job, 1).attempt == 1  # type: ignore[union-attr]
        expected = _expected(clients, list(range(N)))
        for v in _published_delta(running, job).values():
            torch.testing.assert_close(v, torch.full_like(v, expected), atol=1e-5, rtol=0)
    finally:
        running.stop(grace=0.5)


def test_hostile_protocol_messages_get_stable_codes_and_change_nothing(coordinator, admin, secure_job) -> None:  # type: ignore[no-untyped-def]
    job = secure_job(phase=30)
    # One client never sends its shares, so the share phase stays open (rounds move the moment the
    # last answer is in) while the hostile messages arrive.
    clients = _federation(coordinator, admin, job, {N - 1: pb.SHARE})
    state = coordinator.coordinator.state
    _drive(clients, lambda: (s := state.secagg_round(job, 1)) is not None and s.phase == "share")
    sec = state.secagg_round(job, 1)
    assert sec is not None
    c = next(c for c in clients if c.client_id == sec.members[0])
    params = SecAggParams.from_bytes(sec.params)
    stranger = next(j for j in range(N) if j not in params.graph[0] and j != 0)
    base = {"job_id": job, "round": 1, "attempt": sec.attempt}
    bad_share = EncryptedShare(sender=0, receiver=stranger, ciphertext=b"x" * 60).to_bytes()
    forged = EncryptedShare(sender=1, receiver=min(params.graph[0]), ciphertext=b"x" * 60).to_bytes()
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: [
            pb.SecAggMessage(phase=pb.SHARE, shares=[bad_share], **base),   # a share for a non-neighbour
            pb.SecAggMessage(phase=pb.SHARE, shares=[forged], **base),      # in another client's name
            pb.SecAggMessage(phase=pb.SHARE, shares=[b"\x00garbage"], **base),
            pb.SecAggMessage(phase=pb.SECAGG_PHASE_UNSPECIFIED, **base),
        ],
        grpc.StatusCode.FAILED_PRECONDITION: [
            pb.SecAggMessage(phase=pb.ADVERTISE, payload=b"late", **base),  # adverts are closed
            pb.SecAggMessage(phase=pb.SHARE, **{**base, "attempt": 7}),
            pb.SecAggMessage(phase=pb.UNMASK, payload=b"early", **base),
        ],
    }
    before = state.secagg_messages(job, 1, sec.attempt, "share")
    for code, messages in cases.items():
        for m in messages:
            assert _code(lambda m=m: c.stub.SecAgg(m, metadata=c.md("SecAgg"))) == code
    assert state.secagg_messages(job, 1, sec.attempt, "share") == before
    # Let the protocol reach the mask phase (c now sends its real shares, so the share phase ends
    # without waiting for its deadline), with nobody answering it: the phase stays open, and c
    # then sends a masked vector of the wrong length.
    for x in clients:
        x.drop_at = pb.MASK
    _drive(clients, lambda: (s := state.secagg_round(job, 1)) is not None and s.phase == "mask", timeout=60)
    task = c.participant._attempts[(job, 1, sec.attempt)].task
    short = MaskedInput(sender=0, peers=frozenset(params.graph[0]), vector=np.zeros(5, dtype=np.uint32)).to_bytes()
    assert _code(lambda: c.upload_masked(task, short, sec.attempt)) == grpc.StatusCode.INVALID_ARGUMENT
    assert c.client_id not in {u.client_id for u in state.updates(job, 1)}
