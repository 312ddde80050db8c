"""The client API's error contract, over real gRPC against an in-process coordinator.

Each bad request gets a stable status code and changes nothing: the round still completes with
the good updates, and nothing is counted twice.
"""

from __future__ import annotations

import hashlib
import math

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.client.transfer import upload_messages
from fedtune.crypto.envelope import SCHEME, UpdateBinding, seal
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from tests.conftest import Admin, make_spec, wait_until


class RawClient:
    """A hand-driven client: joins, polls, downloads and uploads exactly what a test says."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.sign_key = Ed25519PrivateKey.generate()
        reply = self.stub.Join(pb.JoinRequest(
            token=token, client_name="raw", sign_public_key=raw_public_bytes(self.sign_key),
            kx_public_key=raw_public_bytes(X25519PrivateKey.generate())))
        self.client_id = reply.client_id

    def md(self, method: str) -> list[tuple[str, str]]:
        return sign_request(self.sign_key, "/fedtune.v1.ClientService/" + method, self.client_id)

    def task(self) -> pb.Task:
        def poll() -> pb.Task | None:
            r = self.stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id), metadata=self.md("Heartbeat"))
            return r.task if r.action == pb.HeartbeatReply.TRAIN else None

        return wait_until(poll, what="a task")

    def download(self, sha: str, offset: int = 0) -> bytes:
        stream = self.stub.Download(pb.DownloadRequest(sha256=sha, offset=offset), metadata=self.md("Download"))
        return b"".join(c.data for c in stream)

    def global_state(self, task: pb.Task) -> dict[str, torch.Tensor]:
        return bytes_to_tensors(self.download(task.global_adapter.sha256))

    def sealed(self, task: pb.Task, plain: bytes, update_id: str = "u1", bind: UpdateBinding | None = None,
               **kw: object) -> tuple[pb.UpdateHeader, bytes]:
        """A header and the envelope of ``plain``, sealed for the header's job, round and update id."""
        fields: dict[str, object] = {
            "job_id": task.job_id, "round": task.round, "task_id": task.task_id, "update_id": update_id,
            "num_examples": 10, "codec": "fp32", "envelope": SCHEME, "metrics": {"train_loss": 1.0},
        }
        fields.update({k: v for k, v in kw.items() if k not in ("total_size", "sha256")})
        binding = bind or UpdateBinding(str(fields["job_id"]), int(fields["round"]), self.client_id,  # type: ignore[call-overload]
                                        update_id)
        payload = seal(plain, task.job_public_key, binding)
        fields["total_size"] = kw.get("total_size", len(payload))
        fields["sha256"] = kw.get("sha256", hashlib.sha256(payload).hexdigest())
        return pb.UpdateHeader(**fields), payload

    def send(self, task: pb.Task, plain: bytes, update_id: str = "u1", **kw: object) -> pb.UploadReply:
        return self.upload(*self.sealed(task, plain, update_id, **kw))

    def upload(self, header: pb.UpdateHeader, payload: bytes) -> pb.UploadReply:
        return self.stub.Upload(upload_messages(header, payload), metadata=self.md("Upload"))

    def upload_raw(self, messages: list[pb.UploadMessage]) -> pb.UploadReply:
        return self.stub.Upload(iter(messages), metadata=self.md("Upload"))


def _join(token: str) -> pb.JoinRequest:
    return pb.JoinRequest(token=token, sign_public_key=raw_public_bytes(Ed25519PrivateKey.generate()),
                          kx_public_key=raw_public_bytes(X25519PrivateKey.generate()))


def _delta(state: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in state.items()}


def _code(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


@pytest.fixture
def round_setup(coordinator, admin: Admin):  # type: ignore[no-untyped-def]
    """A job with 2 clients per round and one open round; returns (coordinator, job, c1, c2, task1, task2)."""
    job = admin.create_job(make_spec(clients=2, min_clients=2))
    c1 = RawClient(coordinator.address, admin.token(job))
    c2 = RawClient(coordinator.address, admin.token(job))
    # Both must be live before the engine opens the round with a cohort of 2.
    c2.stub.Heartbeat(pb.HeartbeatRequest(client_id=c2.client_id), metadata=c2.md("Heartbeat"))
    t1, t2 = c1.task(), c2.task()
    yield coordinator, job, c1, c2, t1, t2
    c1.channel.close()
    c2.channel.close()


def test_bad_tokens_are_refused(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec())
    stub = pb_grpc.ClientServiceStub(grpc.insecure_channel(coordinator.address))
    assert _code(lambda: stub.Join(_join("ftk_made-up"))) == grpc.StatusCode.UNAUTHENTICATED
    token = admin.token(job, uses=1)
    stub.Join(_join(token))
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(_join(token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no uses left" in info.value.details()
    expired = admin.token(job, ttl=1)
    import time

    time.sleep(1.2)
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(_join(expired))
    assert "expired" in info.value.details()
    assert len(coordinator.coordinator.state.clients(job)) == 1


def test_calls_without_credentials_are_denied(coordinator) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(coordinator.address)
    client = pb_grpc.ClientServiceStub(channel)
    admin = pb_grpc.AdminServiceStub(channel)
    assert _code(lambda: client.Heartbeat(pb.HeartbeatRequest(client_id="x"))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: client.Heartbeat(pb.HeartbeatRequest(), metadata=[("x-fedtune-session", "fts_bogus")])) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: admin.ListJobs(pb.ListJobsRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: admin.ListJobs(pb.ListJobsRequest(), metadata=[("x-fedtune-admin", "wrong")])) \
        == grpc.StatusCode.UNAUTHENTICATED


def test_bad_updates_are_rejected_and_the_round_is_unaffected(round_setup) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, c2, t1, t2 = round_setup
    state = running.coordinator.state
    g = c1.global_state(t1)

    def bad(tensors: dict[str, torch.Tensor], **kw: object) -> grpc.StatusCode:
        return _code(lambda: c1.send(t1, tensors_to_bytes(tensors), update_id="bad", **kw))

    name = min(g)
    wrong_shape = {**_delta(g, 0.1), name: torch.zeros(3, 3)}
    assert bad(wrong_shape) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad({k: v for k, v in _delta(g, 0.1).items() if k != name}) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad({**_delta(g, 0.1), "extra.weight": torch.zeros(2)}) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad({k: v.half() for k, v in _delta(g, 0.1).items()}) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad({**_delta(g, 0.1), name: torch.full_like(g[name], math.nan)}) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad({**_delta(g, 0.1), name: torch.full_like(g[name], math.inf)}) == grpc.StatusCode.INVALID_ARGUMENT
    assert bad(_delta(g, 0.1), job_id="job-other") == grpc.StatusCode.FAILED_PRECONDITION
    assert bad(_delta(g, 0.1), round=t1.round + 1) == grpc.StatusCode.FAILED_PRECONDITION
    assert bad(_delta(g, 0.1), task_id=t2.task_id) == grpc.StatusCode.FAILED_PRECONDITION
    assert bad(_delta(g, 0.1), codec="fp16") == grpc.StatusCode.INVALID_ARGUMENT
    assert bad(_delta(g, 0.1), num_examples=0) == grpc.StatusCode.INVALID_ARGUMENT
    # Not a safetensors blob at all.
    assert _code(lambda: c1.send(t1, b"\x00" * 64, update_id="junk")) == grpc.StatusCode.INVALID_ARGUMENT
    assert state.updates(job, t1.round) == []

    # The good updates still make the round.
    p1, p2 = tensors_to_bytes(_delta(g, 0.1)), tensors_to_bytes(_delta(g, 0.3))
    assert not c1.send(t1, p1).duplicate
    assert not c2.send(t2, p2, update_id="u2", num_examples=30).duplicate
    wait_until(lambda: state.job(job).state == "finished", what="round 1 to publish")
    published = state.round(job, 1)
    new = bytes_to_tensors(running.coordinator.store.read(published.global_out))
    # FedAvg weighted 10:30 -> 0.1*0.25 + 0.3*0.75 = 0.25.
    for k in g:
        torch.testing.assert_close(new[k], g[k] + 0.25)
    assert published.metrics["contributors"] == 2


def test_update_retry_is_stored_once_and_late_updates_are_refused(round_setup) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, c2, t1, t2 = round_setup
    state = running.coordinator.state
    g = c1.global_state(t1)
    p1 = tensors_to_bytes(_delta(g, 0.1))
    assert not c1.send(t1, p1, update_id="same").duplicate
    assert c1.send(t1, p1, update_id="same").duplicate
    # A second, different update from the same client for the same round is refused.
    p1b = tensors_to_bytes(_delta(g, 0.2))
    assert _code(lambda: c1.send(t1, p1b, update_id="other")) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(state.updates(job, 1)) == 1
    p2 = tensors_to_bytes(_delta(g, 0.3))
    c2.send(t2, p2, update_id="u2")
    wait_until(lambda: state.job(job).state == "finished", what="round 1 to publish")
    # The round is closed now: a late update is refused, a retry of an accepted one is still acknowledged.
    assert _code(lambda: c1.send(t1, p1b, update_id="late")) == grpc.StatusCode.FAILED_PRECONDITION
    assert c1.send(t1, p1, update_id="same").duplicate
    assert state.round(job, 1).metrics["contributors"] == 2


def test_broken_upload_streams(round_setup) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, _c2, t1, _t2 = round_setup
    g = c1.global_state(t1)
    plain = tensors_to_bytes(_delta(g, 0.1))
    h, payload = c1.sealed(t1, plain, update_id="s")
    half = len(payload) // 2
    chunk = lambda off, data: pb.UploadMessage(chunk=pb.Chunk(offset=off, data=data))
    commit = pb.UploadMessage(commit=pb.UploadCommit(sha256=h.sha256))
    head = pb.UploadMessage(header=h)
    ends_early = [head, chunk(0, payload[:half])]
    no_commit_short = [head, chunk(0, payload[:half]), commit]
    out_of_order = [head, chunk(half, payload[half:]), chunk(0, payload[:half]), commit]
    no_header = [chunk(0, payload), commit]
    for messages in (ends_early, no_commit_short, out_of_order, no_header):
        assert _code(lambda m=messages: c1.upload_raw(m)) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_sha = [pb.UploadMessage(header=c1.sealed(t1, plain, update_id="s", sha256="0" * 64)[0]),
                 chunk(0, payload), commit]
    assert _code(lambda: c1.upload_raw(wrong_sha)) == grpc.StatusCode.INVALID_ARGUMENT
    too_long = [head, chunk(0, payload), chunk(len(payload), b"x"), commit]
    assert _code(lambda: c1.upload_raw(too_long)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    oversized, _ = c1.sealed(t1, plain, update_id="big", total_size=10**9)
    assert _code(lambda: c1.upload_raw([pb.UploadMessage(header=oversized)])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A single message over the 4 MiB limit is refused by gRPC itself.
    huge = [head, chunk(0, b"x" * (5 << 20)), commit]
    assert _code(lambda: c1.upload_raw(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.coordinator.state.updates(job, 1) == []
    # And the client can still send its real update afterwards.
    assert not c1.upload(h, payload).duplicate


def test_downloads_resume_and_are_scoped_to_the_job(round_setup, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    running, _job, c1, _c2, t1, _t2 = round_setup
    ref = max(t1.base_files, key=lambda f: f.size)
    whole = c1.download(ref.sha256)
    assert hashlib.sha256(whole).hexdigest() == ref.sha256 and len(whole) == ref.size
    assert c1.download(ref.sha256, offset=1000) == whole[1000:]
    assert _code(lambda: c1.download(ref.sha256, offset=ref.size + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: c1.download("0" * 64)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: c1.download("not-a-digest")) == grpc.StatusCode.NOT_FOUND
    # A blob of another job is not served to this job's client.
    other = admin.create_job(make_spec().replace("r: 4,", "r: 2,"))
    other_adapter = running.coordinator.state.job(other).initial_adapter
    assert _code(lambda: c1.download(other_adapter)) == grpc.StatusCode.NOT_FOUND


def test_admin_errors(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job("name: x\nbogus_key: 1\n")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bogus_key" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job("peft: {target_modules: [no_such_module]}\n")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_modules" in info.value.details()
    assert _code(lambda: admin.job("job-nope")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: admin.token("job-nope")) == grpc.StatusCode.NOT_FOUND
    assert coordinator.coordinator.state.jobs() == []
