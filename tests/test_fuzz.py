"""Hostile input against the gRPC surface (hypothesis): the coordinator never crashes, answers with
a stable status code, and a rejected request changes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.coordinator.server import start
from fedtune.crypto.keys import raw_public_bytes
from fedtune.peft_io import tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, make_spec
from tests.test_rpc_contract import RawClient, _delta

# What a peer may provoke. INTERNAL only from gRPC itself when bytes do not parse as the protobuf.
PEER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    running = start(Path(tmp_path_factory.mktemp("fuzz")) / "coord", "127.0.0.1", 0, insecure=True)
    admin = Admin(running)
    job = admin.create_job(make_spec(clients=2, min_clients=2))
    c1, c2 = RawClient(running.address, admin.token(job)), RawClient(running.address, admin.token(job))
    c2.stub.Heartbeat(pb.HeartbeatRequest(client_id=c2.client_id), metadata=c2.md("Heartbeat"))
    task = c1.task()
    c2.task()
    plain = tensors_to_bytes(_delta(c1.global_state(task), 0.01))
    yield running, job, c1, task, plain
    running.stop(grace=0.5)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _state(running, job: str) -> tuple[int, int, str]:  # type: ignore[no-untyped-def]
    st_ = running.coordinator.state
    return len(st_.updates(job, 1)), len(st_.clients(job)), st_.round(job, 1).state


chunk_st = st.builds(lambda off, data: pb.UploadMessage(chunk=pb.Chunk(offset=off, data=data)),
                     st.integers(0, 1 << 40), st.binary(max_size=256))
header_st = st.builds(
    lambda job, rnd, task, uid, n, size, sha, codec, env: pb.UploadMessage(header=pb.UpdateHeader(
        job_id=job, round=rnd, task_id=task, update_id=uid, num_examples=n, total_size=size, sha256=sha,
        codec=codec, envelope=env)),
    st.sampled_from(["", "job-x"]) | st.text(max_size=20), st.integers(0, 5), st.text(max_size=20),
    st.text(max_size=200), st.integers(0, 1 << 63), st.integers(0, 1 << 63), st.text(max_size=70),
    st.sampled_from(["fp32", "fp16", "", "zip"]), st.sampled_from(["", "x25519-hkdf-sha256-aes256gcm/v1"]))
commit_st = st.builds(lambda s: pb.UploadMessage(commit=pb.UploadCommit(sha256=s)), st.text(max_size=70))


@FUZZ
@given(messages=st.lists(st.one_of(header_st, chunk_st, commit_st), max_size=6))
def test_random_upload_streams(world, messages) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, _task, _plain = world
    before = _state(running, job)
    with pytest.raises(grpc.RpcError) as info:
        c1.upload_raw(messages)
    assert info.value.code() in PEER_CODES, info.value.details()
    assert _state(running, job) == before


@FUZZ
@given(cut=st.integers(0, 10_000), swap=st.booleans(), flip=st.integers(0, 10_000))
def test_truncated_reordered_or_corrupted_real_uploads(world, cut: int, swap: bool, flip: int) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, task, plain = world
    header, env = c1.sealed(task, plain, update_id="fuzz")
    body = bytearray(env)
    body[flip % len(body)] ^= 0x5A
    data = bytes(body)[: len(body) - (cut % len(body))] if cut else bytes(body)
    half = len(data) // 2
    chunks = [pb.UploadMessage(chunk=pb.Chunk(offset=0, data=data[:half])),
              pb.UploadMessage(chunk=pb.Chunk(offset=half, data=data[half:]))]
    if swap:
        chunks.reverse()
    messages = [pb.UploadMessage(header=header), *chunks, pb.UploadMessage(commit=pb.UploadCommit())]
    before = _state(running, job)
    with pytest.raises(grpc.RpcError) as info:
        c1.upload_raw(messages)
    assert info.value.code() in PEER_CODES
    assert _state(running, job) == before


@FUZZ
@given(sha=st.text(max_size=80) | st.binary(min_size=32, max_size=32).map(lambda b: hashlib.sha256(b).hexdigest()),
       offset=st.integers(0, 1 << 63))
def test_random_downloads(world, sha: str, offset: int) -> None:  # type: ignore[no-untyped-def]
    _running, _job, c1, _task, _plain = world
    with pytest.raises(grpc.RpcError) as info:
        c1.download(sha, offset)
    assert info.value.code() in PEER_CODES


@FUZZ
@given(token=st.text(max_size=60), sign=st.binary(max_size=40), kx=st.binary(max_size=40),
       name=st.text(max_size=300))
def test_random_joins(world, token: str, sign: bytes, kx: bytes, name: str) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, _task, _plain = world
    before = _state(running, job)
    for request in (pb.JoinRequest(token=token, sign_public_key=sign, kx_public_key=kx, client_name=name),
                    pb.JoinRequest(token=token, client_name=name,
                                   sign_public_key=raw_public_bytes(Ed25519PrivateKey.generate()),
                                   kx_public_key=raw_public_bytes(X25519PrivateKey.generate()))):
        with pytest.raises(grpc.RpcError) as info:
            c1.stub.Join(request)
        assert info.value.code() in PEER_CODES
    assert _state(running, job) == before


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=512), method=st.sampled_from(["Join", "Heartbeat", "Download", "Upload"]))
def test_malformed_protobuf_bytes(world, raw: bytes, method: str) -> None:  # type: ignore[no-untyped-def]
    running, job, c1, _task, _plain = world
    before = _state(running, job)
    path = "/fedtune.v1.ClientService/" + method
    md = None if method == "Join" else c1.md(method)
    if method == "Upload":
        call = c1.channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        fn = lambda: call(iter([raw]), metadata=md, timeout=10)
    elif method == "Download":
        stream = c1.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        fn = lambda: list(stream(raw, metadata=md, timeout=10))
    else:
        unary = c1.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        fn = lambda: unary(raw, metadata=md, timeout=10)
    try:
        fn()
    except grpc.RpcError as e:
        # gRPC answers INTERNAL itself when the bytes are not the message type.
        assert e.code() in PEER_CODES | {grpc.StatusCode.INTERNAL}, e.details()
    assert _serving(running.address)
    assert _state(running, job)[0] == before[0]
