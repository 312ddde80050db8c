"""Envelopes, signed requests, token revocation and signed manifests."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.crypto.envelope import OVERHEAD, UpdateBinding, open_envelope, seal
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.crypto.signing import sign_manifest, verify_manifest
from fedtune.errors import InvalidInput
from fedtune.peft_io import tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, make_spec, wait_until
from tests.test_rpc_contract import RawClient, _code, _delta

BIND = UpdateBinding("job-1", 3, "client-1", "upd-1")


def test_envelope_round_trips_with_60_bytes_of_overhead() -> None:
    key = X25519PrivateKey.generate()
    payload = b"adapter delta bytes" * 10
    env = seal(payload, raw_public_bytes(key), BIND)
    assert len(env) == len(payload) + OVERHEAD == len(payload) + 60
    assert payload not in env
    assert open_envelope(env, key, BIND) == payload


def test_flipping_any_byte_of_an_envelope_is_rejected() -> None:
    key = X25519PrivateKey.generate()
    env = seal(b"x" * 40, raw_public_bytes(key), BIND)
    for i in range(len(env)):
        for flip in (0x01, 0x80):
            bad = bytearray(env)
            bad[i] ^= flip
            with pytest.raises(InvalidInput, match="failed authentication"):
                open_envelope(bytes(bad), key, BIND)
    with pytest.raises(InvalidInput):
        open_envelope(env[:-1], key, BIND)
    with pytest.raises(InvalidInput):
        open_envelope(env[:10], key, BIND)


@pytest.mark.parametrize("other", [
    UpdateBinding("job-2", 3, "client-1", "upd-1"),
    UpdateBinding("job-1", 4, "client-1", "upd-1"),
    UpdateBinding("job-1", 3, "client-2", "upd-1"),
    UpdateBinding("job-1", 3, "client-1", "upd-2"),
    # Length prefixes keep fields from bleeding into each other.
    UpdateBinding("job-1", 3, "client-1upd", "-1"),
])
def test_an_envelope_is_bound_to_job_round_client_and_update(other: UpdateBinding) -> None:
    key = X25519PrivateKey.generate()
    env = seal(b"payload", raw_public_bytes(key), BIND)
    with pytest.raises(InvalidInput):
        open_envelope(env, key, other)
    # Another job's key cannot open it either.
    with pytest.raises(InvalidInput):
        open_envelope(env, X25519PrivateKey.generate(), BIND)


@pytest.fixture
def one_client_round(coordinator, admin: Admin):  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec(clients=1))
    token = admin.token(job)
    client = RawClient(coordinator.address, token)
    task = client.task()
    yield coordinator, admin, job, token, client, task
    client.channel.close()


def test_tampered_replayed_or_unsealed_updates_are_rejected_over_grpc(one_client_round) -> None:  # type: ignore[no-untyped-def]
    running, _admin, job, _token, c, task = one_client_round
    plain = tensors_to_bytes(_delta(c.global_state(task), 0.01))
    header, env = c.sealed(task, plain, update_id="u1")
    for i in (0, 31, 32, 43, 44, len(env) // 2, len(env) - 1):
        bad = bytearray(env)
        bad[i] ^= 0x01
        h, _ = c.sealed(task, plain, update_id="u1")
        h.sha256 = hashlib.sha256(bytes(bad)).hexdigest()
        h.total_size = len(bad)
        assert _code(lambda b=bytes(bad), hh=h: c.upload(hh, b)) == grpc.StatusCode.INVALID_ARGUMENT
    # Sealed for another update id, another round, or not sealed at all.
    for bind in (UpdateBinding(job, task.round, c.client_id, "u-other"),
                 UpdateBinding(job, task.round + 1, c.client_id, "u1")):
        assert _code(lambda bb=bind: c.send(task, plain, update_id="u1", bind=bb)) == grpc.StatusCode.INVALID_ARGUMENT
    unsealed = pb.UpdateHeader(job_id=job, round=task.round, task_id=task.task_id, update_id="u1", num_examples=1,
                               total_size=len(plain), codec="fp32", envelope=header.envelope,
                               sha256=hashlib.sha256(plain).hexdigest())
    assert _code(lambda: c.upload(unsealed, plain)) == grpc.StatusCode.INVALID_ARGUMENT
    assert running.coordinator.state.updates(job, task.round) == []
    # The genuine envelope is accepted, and it stays encrypted at rest.
    assert not c.upload(header, env).duplicate
    (stored,) = running.coordinator.state.updates(job, task.round)
    blob = running.coordinator.store.read(stored.sha256)
    assert blob == env and plain not in blob


def test_requests_must_be_signed_by_the_enrolled_key_and_recent(one_client_round) -> None:  # type: ignore[no-untyped-def]
    _running, _admin, _job, _token, c, _task = one_client_round
    hb = pb.HeartbeatRequest(client_id=c.client_id)
    method = "/fedtune.v1.ClientService/Heartbeat"
    forged = sign_request(Ed25519PrivateKey.generate(), method, c.client_id)
    stale = sign_request(c.sign_key, method, c.client_id, now=time.time() - 3600)
    other_method = sign_request(c.sign_key, "/fedtune.v1.ClientService/Download", c.client_id)
    for md in (forged, stale, other_method, [("x-fedtune-client", c.client_id)]):
        assert _code(lambda m=md: c.stub.Heartbeat(hb, metadata=m)) == grpc.StatusCode.UNAUTHENTICATED
    c.stub.Heartbeat(hb, metadata=c.md("Heartbeat"))


def test_a_revoked_token_can_neither_join_nor_submit(one_client_round) -> None:  # type: ignore[no-untyped-def]
    running, admin, job, token, c, task = one_client_round
    spare = admin.token(job, uses=5)
    reply = admin.stub.RevokeToken(pb.RevokeTokenRequest(token=token), metadata=admin.md)
    assert reply.clients == 1
    with pytest.raises(grpc.RpcError) as info:
        RawClient(running.address, token)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: c.send(task, b"whatever")) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: c.stub.Heartbeat(pb.HeartbeatRequest(), metadata=c.md("Heartbeat"))) \
        == grpc.StatusCode.UNAUTHENTICATED
    # Revoking by id works too, and other tokens are untouched.
    created = admin.stub.CreateToken(pb.CreateTokenRequest(job_id=job), metadata=admin.md)
    admin.stub.RevokeToken(pb.RevokeTokenRequest(token=created.token_id), metadata=admin.md)
    with pytest.raises(grpc.RpcError):
        RawClient(running.address, created.token)
    RawClient(running.address, spare)


def test_manifest_signature_covers_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    manifest = sign_manifest({"job": "j", "round": 2, "files": {"a": "0" * 64}}, key)
    signer = verify_manifest(manifest)
    assert verify_manifest(manifest, trusted_public_key=signer) == signer
    for change in ({"round": 3}, {"files": {"a": "1" * 64}}, {"extra": 1}):
        with pytest.raises(InvalidInput, match="does not verify"):
            verify_manifest({**manifest, **change})
    with pytest.raises(InvalidInput, match="another key"):
        verify_manifest(sign_manifest({"job": "j"}, Ed25519PrivateKey.generate()), trusted_public_key=signer)
    with pytest.raises(InvalidInput, match="not signed"):
        verify_manifest({"job": "j"})


def test_published_adapters_are_signed_by_the_coordinator(one_client_round, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    running, admin, job, _token, c, task = one_client_round
    c.send(task, tensors_to_bytes(_delta(c.global_state(task), 0.01)))
    wait_until(lambda: running.coordinator.state.job(job).state == "finished", what="the round to publish")
    (_j, _r, path, _m) = running.coordinator.state.published(job)[0]
    manifest = json.loads((Path(path) / "fedtune.json").read_text())
    info = admin.stub.GetInfo(pb.GetInfoRequest(), metadata=admin.md)
    # The copy the admin API lists is the signed text itself.
    (listed,) = admin.stub.ListAdapters(pb.ListAdaptersRequest(job_id=job), metadata=admin.md).adapters
    assert verify_manifest(json.loads(listed.manifest_json), base64.b64encode(info.signing_public_key).decode())
    assert verify_manifest(manifest, base64.b64encode(info.signing_public_key).decode())
