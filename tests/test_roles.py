"""Operator roles over real gRPC: identities (tokens and Ed25519 keys), the role each admin RPC
needs, refusals that change nothing, and the audit log of every admin call.

An in-process coordinator on a loopback port picked at run time; the CLI in a subprocess.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.coordinator.roles import ADMIN_RPC_ROLES
from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import SIG_KEY, sign_admin_request
from fedtune.errors import ExitCode
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from tests.conftest import Admin, fedtune_cmd, make_spec

SVC = "/fedtune.v1.AdminService/"
Creds = Callable[[str], list[tuple[str, str]]]


def token_creds(token: str) -> Creds:
    return lambda _method: [("x-fedtune-admin", token)]


def key_creds(key: Ed25519PrivateKey, **kw: Any) -> Creds:
    return lambda method: sign_admin_request(key, SVC + method, **kw)


class As:
    """The admin API called with one identity's credentials."""

    def __init__(self, stub: pb_grpc.AdminServiceStub, creds: Creds) -> None:
        self.stub, self.creds = stub, creds

    def __call__(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, metadata=self.creds(method), timeout=30)

    def refused(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self(method, request)
        return info.value.code(), info.value.details()


def audit_lines(running: RunningCoordinator) -> list[dict[str, Any]]:
    path = running.coordinator.state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(running: RunningCoordinator) -> tuple[Any, ...]:
    """Everything an admin call can change: jobs, tokens, identities."""
    state_dir = running.coordinator.state_dir
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        jobs = db.execute("SELECT job_id, state FROM jobs ORDER BY job_id").fetchall()
        tokens = db.execute("SELECT token_hash, uses_left, revoked FROM tokens ORDER BY token_hash").fetchall()
    finally:
        db.close()
    admins = (state_dir / "admins.json").read_text() if (state_dir / "admins.json").exists() else ""
    return jobs, tokens, admins


@pytest.fixture
def api(coordinator: RunningCoordinator, admin: Admin) -> Iterator[tuple[RunningCoordinator, As, pb_grpc.AdminServiceStub]]:
    """(coordinator, the built-in admin token's view of the API, a bare stub)."""
    yield coordinator, As(admin.stub, lambda _m: admin.md), admin.stub


def add_token_identity(root: As, stub: pb_grpc.AdminServiceStub, name: str, role: str) -> As:
    reply = root("AddAdmin", pb.AddAdminRequest(name=name, role=role))
    assert reply.token.startswith("fto_") and reply.identity.role == role
    return As(stub, token_creds(reply.token))


def test_viewer_reads_but_a_job_or_token_is_refused_audited_and_changes_nothing(api) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    job = root("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec())).job_id
    vera = add_token_identity(root, stub, "vera", "viewer")
    assert vera("GetInfo", pb.GetInfoRequest()).version
    assert [j.job_id for j in vera("ListJobs", pb.ListJobsRequest()).jobs] == [job]
    # A status with clients in it (repeated fields in the reply the audit line summarizes).
    token = root("CreateToken", pb.CreateTokenRequest(job_id=job)).token
    with grpc.insecure_channel(running.address) as channel:
        pb_grpc.ClientServiceStub(channel).Join(pb.JoinRequest(
            token=token, client_name="c", sign_public_key=raw_public_bytes(Ed25519PrivateKey.generate()),
            kx_public_key=raw_public_bytes(X25519PrivateKey.generate())), timeout=30)
    status = vera("GetJob", pb.GetJobRequest(job_id=job))
    assert status.state in ("queued", "running") and len(status.clients) == 1
    assert audit_lines(running)[-1]["result"] == {"job_id": job}
    before, lines_before = snapshot(running), len(audit_lines(running))
    code, message = vera.refused("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec()))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "\n" not in message and "CreateJob needs role operator or admin; vera has role viewer" in message
    for method, request in (("CreateToken", pb.CreateTokenRequest(job_id=job)),
                            ("CancelJob", pb.GetJobRequest(job_id=job)),
                            ("AddAdmin", pb.AddAdminRequest(name="mallory", role="admin"))):
        assert vera.refused(method, request)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert snapshot(running) == before
    refusals = audit_lines(running)[lines_before:]
    assert [(r["who"], r["role"], r["method"], r["outcome"], r["code"]) for r in refusals] == [
        ("vera", "viewer", m, "denied", "PERMISSION_DENIED") for m in ("CreateJob", "CreateToken", "CancelJob", "AddAdmin")]
    assert refusals[0]["message"] == message
    assert refusals[1]["request"] == {"job_id": job}
    assert refusals[3]["request"] == {"name": "mallory", "role": "admin"}


def test_operator_runs_jobs_and_tokens_but_cannot_manage_identities(api) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    otto = add_token_identity(root, stub, "otto", "operator")
    job = otto("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec())).job_id
    created = otto("CreateToken", pb.CreateTokenRequest(job_id=job, uses=2))
    assert otto("RevokeToken", pb.RevokeTokenRequest(token=created.token_id)).token_id == created.token_id
    before = snapshot(running)
    for method, request in (("AddAdmin", pb.AddAdminRequest(name="eve", role="admin")),
                            ("RemoveAdmin", pb.RemoveAdminRequest(name="otto")),
                            ("ListAdmins", pb.ListAdminsRequest()), ("ReadAudit", pb.ReadAuditRequest())):
        code, message = otto.refused(method, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"{method} needs role admin; otto has role operator" in message
    assert snapshot(running) == before
    assert otto("CancelJob", pb.GetJobRequest(job_id=job)).state == "cancelled"
    ok = [r for r in audit_lines(running) if r["who"] == "otto" and r["outcome"] == "ok"]
    assert [r["method"] for r in ok] == ["CreateJob", "CreateToken", "RevokeToken", "CancelJob"]
    # The audit line names what was made, never the token itself.
    assert ok[0]["result"] == {"job_id": job}
    assert ok[1]["request"] == {"job_id": job, "uses": 2} and ok[1]["result"] == {"token_id": created.token_id}
    assert created.token not in (running.coordinator.state_dir / "audit.jsonl").read_text()


def test_the_built_in_token_and_an_admin_identity_can_do_everything(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    ada = add_token_identity(root, stub, "ada", "admin")
    for who in (root, ada):
        job = who("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec())).job_id
        who("CreateToken", pb.CreateTokenRequest(job_id=job))
        who("CancelJob", pb.GetJobRequest(job_id=job))
        who("ListAdapters", pb.ListAdaptersRequest())
    ada("AddAdmin", pb.AddAdminRequest(name="temp", role="viewer"))
    names = {i.name: (i.role, i.kind, i.created_by) for i in ada("ListAdmins", pb.ListAdminsRequest()).identities}
    assert names == {"admin.token": ("admin", "admin-token", names["admin.token"][2]),
                     "ada": ("admin", "token", "admin.token"), "temp": ("viewer", "token", "ada")}
    assert ada("RemoveAdmin", pb.RemoveAdminRequest(name="temp")).name == "temp"
    assert ada("ReadAudit", pb.ReadAuditRequest(who="ada", limit=1)).lines[0].count('"RemoveAdmin"') == 1
    # Only hashes are stored.
    assert "fto_" not in (running.coordinator.state_dir / "admins.json").read_text()
    # Bad requests of an admin are refused with their reason and change nothing either.
    before = snapshot(running)
    for request, code in ((pb.AddAdminRequest(name="ada", role="viewer"), grpc.StatusCode.FAILED_PRECONDITION),
                          (pb.AddAdminRequest(name="x", role="root"), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.AddAdminRequest(name="admin.token", role="admin"), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.AddAdminRequest(name="k", role="viewer", public_key=b"short"),
                           grpc.StatusCode.INVALID_ARGUMENT)):
        assert ada.refused("AddAdmin", request)[0] == code
    assert ada.refused("RemoveAdmin", pb.RemoveAdminRequest(name="admin.token"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert ada.refused("RemoveAdmin", pb.RemoveAdminRequest(name="nobody"))[0] == grpc.StatusCode.NOT_FOUND
    assert snapshot(running) == before
    assert audit_lines(running)[-1]["outcome"] == "error" and audit_lines(running)[-1]["code"] == "NOT_FOUND"


def test_a_removed_identity_is_refused(api) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    rita = add_token_identity(root, stub, "rita", "operator")
    key = Ed25519PrivateKey.generate()
    root("AddAdmin", pb.AddAdminRequest(name="kai", role="viewer", public_key=raw_public_bytes(key)))
    kai = As(stub, key_creds(key))
    rita("ListJobs", pb.ListJobsRequest())
    kai("ListJobs", pb.ListJobsRequest())
    for name in ("rita", "kai"):
        root("RemoveAdmin", pb.RemoveAdminRequest(name=name))
    assert rita.refused("ListJobs", pb.ListJobsRequest())[0] == grpc.StatusCode.UNAUTHENTICATED
    code, message = kai.refused("ListJobs", pb.ListJobsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "admin key is not registered" in message
    assert [(r["who"], r["auth"], r["outcome"]) for r in audit_lines(running)[-2:]] == [
        ("unknown", "token", "denied"), ("unknown key", "key", "denied")]


def test_a_key_identity_signs_its_calls_and_a_bad_or_stale_signature_is_refused(api) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    key = Ed25519PrivateKey.generate()
    added = root("AddAdmin", pb.AddAdminRequest(name="kim", role="operator", public_key=raw_public_bytes(key)))
    assert added.token == "" and added.identity.kind == "key" and added.identity.key_fingerprint.startswith("ed25519:")
    kim = As(stub, key_creds(key))
    job = kim("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec())).job_id
    assert kim.refused("AddAdmin", pb.AddAdminRequest(name="x", role="viewer"))[0] == grpc.StatusCode.PERMISSION_DENIED

    def forged(method: str) -> list[tuple[str, str]]:
        """kim's key id, someone else's signature."""
        other = dict(sign_admin_request(Ed25519PrivateKey.generate(), SVC + method))
        return [(k, other[SIG_KEY] if k == SIG_KEY else v) for k, v in sign_admin_request(key, SVC + method)]

    before = snapshot(running)
    attempts: list[Creds] = [
        forged,
        key_creds(key, now=time.time() - 3600),  # an hour old
        key_creds(key, now=time.time() + 3600),  # from the future
        lambda _m: sign_admin_request(key, SVC + "ListJobs"),  # signed for another method
        lambda m: [(k, v) for k, v in sign_admin_request(key, SVC + m) if k != SIG_KEY],  # unsigned
        key_creds(Ed25519PrivateKey.generate()),  # a key nobody added
    ]
    for creds in attempts:
        code, message = As(stub, creds).refused("CancelJob", pb.GetJobRequest(job_id=job))
        assert code == grpc.StatusCode.UNAUTHENTICATED, message
    assert snapshot(running) == before
    refused = audit_lines(running)[-len(attempts):]
    assert [r["who"] for r in refused] == ["kim"] * 5 + ["unknown key"]
    assert all(r["method"] == "CancelJob" and r["outcome"] == "denied" and r["auth"] == "key" for r in refused)
    assert "signature does not verify" in refused[0]["message"] and "off the coordinator's clock" in refused[1]["message"]
    # Signed metadata lifted off the wire cannot be sent again, with another body, within its window.
    lifted = sign_admin_request(key, SVC + "CancelJob")
    other_job = kim("CreateJob", pb.CreateJobRequest(spec_yaml=make_spec())).job_id
    kim.stub.CancelJob(pb.GetJobRequest(job_id=other_job), metadata=lifted)
    code, message = As(stub, lambda _m: lifted).refused("CancelJob", pb.GetJobRequest(job_id=job))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "already made once" in message
    assert running.coordinator.state.job(job).state != "cancelled"
    # A key can belong to one identity only.
    dup = root.refused("AddAdmin", pb.AddAdminRequest(name="kim2", role="admin", public_key=raw_public_bytes(key)))
    assert dup[0] == grpc.StatusCode.FAILED_PRECONDITION and "kim" in dup[1]
    assert kim("CancelJob", pb.GetJobRequest(job_id=job)).state == "cancelled"
    assert audit_lines(running)[-1]["who"] == "kim" and audit_lines(running)[-1]["outcome"] == "ok"


def test_no_credential_and_an_unlisted_rpc_are_refused_for_everyone(api, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    anonymous = As(stub, lambda _m: [])
    code, message = anonymous.refused("ListJobs", pb.ListJobsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "admin token missing or wrong" in message
    assert audit_lines(running)[-1] | {"time": None, "unix": None, "peer": None} == {
        "time": None, "unix": None, "peer": None, "who": "unknown", "auth": "none", "role": "", "method": "ListJobs",
        "request": {}, "outcome": "denied", "code": "UNAUTHENTICATED", "message": message}
    # A method without a role in the table is refused even to the built-in admin (deny by default).
    monkeypatch.delitem(ADMIN_RPC_ROLES, "GetInfo")
    code, message = root.refused("GetInfo", pb.GetInfoRequest())
    assert code == grpc.StatusCode.PERMISSION_DENIED and "GetInfo has no entry in ADMIN_RPC_ROLES" in message
    assert audit_lines(running)[-1]["who"] == "admin.token" and audit_lines(running)[-1]["outcome"] == "denied"


def test_a_damaged_identities_file_locks_out_identities_but_not_the_built_in_token(api) -> None:  # type: ignore[no-untyped-def]
    running, root, stub = api
    tess = add_token_identity(root, stub, "tess", "operator")
    (running.coordinator.state_dir / "admins.json").write_text("{not json")
    code, message = tess.refused("ListJobs", pb.ListJobsRequest())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "admins.json is not a fedtune identities file" in message
    assert root("ListJobs", pb.ListJobsRequest()).jobs == []
    assert audit_lines(running)[-2]["code"] == "FAILED_PRECONDITION"


def test_every_admin_rpc_has_a_role() -> None:
    """A new AdminService RPC needs its line in ADMIN_RPC_ROLES (fedtune/coordinator/roles.py)."""
    methods = set(pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)
    assert sorted(methods - set(ADMIN_RPC_ROLES)) == [], "add these to ADMIN_RPC_ROLES in fedtune/coordinator/roles.py"
    assert sorted(set(ADMIN_RPC_ROLES) - methods) == [], "ADMIN_RPC_ROLES names methods AdminService lacks"


def test_the_audit_log_is_one_line_per_call_and_survives_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "coord"
    running = start(state_dir, "127.0.0.1", 0, insecure=True)
    try:
        channel = grpc.insecure_channel(running.address)
        stub = pb_grpc.AdminServiceStub(channel)
        root = As(stub, token_creds((state_dir / "admin.token").read_text().strip()))
        vic = add_token_identity(root, stub, "vic", "viewer")
        vic("ListJobs", pb.ListJobsRequest())
        vic.refused("CreateJob", pb.CreateJobRequest(spec_yaml="name: x"))
        As(stub, token_creds("fto_wrong")).refused("GetInfo", pb.GetInfoRequest())
        stream = stub.PullAdapter(pb.PullAdapterRequest(job_id="job-none"), metadata=root.creds("PullAdapter"))
        with pytest.raises(grpc.RpcError):
            list(stream)
        channel.close()
    finally:
        running.stop(grace=0.5)
    first = (state_dir / "audit.jsonl").read_text()
    lines = [json.loads(line) for line in first.splitlines()]
    assert [(r["who"], r["method"], r["outcome"], r["code"]) for r in lines] == [
        ("admin.token", "AddAdmin", "ok", "OK"), ("vic", "ListJobs", "ok", "OK"),
        ("vic", "CreateJob", "denied", "PERMISSION_DENIED"), ("unknown", "GetInfo", "denied", "UNAUTHENTICATED"),
        ("admin.token", "PullAdapter", "error", "NOT_FOUND")]
    for r in lines:
        assert abs(time.time() - r["unix"]) < 600 and r["time"].endswith("Z") and r["peer"].startswith("ipv")
    assert (state_dir / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    assert (state_dir / "admins.json").stat().st_mode & 0o777 == 0o600

    running = start(state_dir, "127.0.0.1", 0, insecure=True)
    try:
        channel = grpc.insecure_channel(running.address)
        stub = pb_grpc.AdminServiceStub(channel)
        vic.stub = stub
        assert vic("ListJobs", pb.ListJobsRequest()).jobs == []  # the identity survived too
        channel.close()
    finally:
        running.stop(grace=0.5)
    after = (state_dir / "audit.jsonl").read_text()
    assert after.startswith(first) and len(after.splitlines()) == len(lines) + 1
    assert json.loads(after.splitlines()[-1])["who"] == "vic"


def test_the_cli_manages_identities_and_a_viewer_cannot_create_a_job(coordinator: RunningCoordinator,
                                                                      tmp_path: Path) -> None:
    state = ["--state-dir", str(coordinator.coordinator.state_dir)]
    added = fedtune_cmd("admin", "add", "vera", "--role", "viewer", *state, check=True)
    token = added.stdout.strip()
    assert token.startswith("fto_") and "\n" not in token and "shown this once" in added.stderr
    spec = tmp_path / "job.yaml"
    spec.write_text(make_spec())
    refused = fedtune_cmd("job", "create", str(spec), *state, env={"FEDTUNE_ADMIN_TOKEN": token})
    assert refused.returncode == ExitCode.AUTH, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        ("fedtune: error: CreateJob needs role operator or admin; vera has role viewer: "
         "ask an admin for an identity with role operator")]
    assert coordinator.coordinator.state.jobs() == []
    # A key identity, from an OpenSSH key pair as ssh-keygen writes one.
    key = Ed25519PrivateKey.generate()
    (tmp_path / "kim").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
    (tmp_path / "kim.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH))
    shown = fedtune_cmd("admin", "add", "kim", "--role", "operator", "--public-key", str(tmp_path / "kim.pub"), *state,
                        check=True).stdout
    assert shown.startswith("added kim: role operator, key ed25519:")
    job = fedtune_cmd("job", "create", str(spec), *state, "--admin-key", str(tmp_path / "kim"), check=True).stdout.strip()
    assert [j.job_id for j in coordinator.coordinator.state.jobs()] == [job]
    listed = json.loads(fedtune_cmd("admin", "list", *state, "--format", "json", check=True).stdout)
    assert [(i["name"], i["role"], i["kind"]) for i in listed] == [
        ("admin.token", "admin", "admin-token"), ("kim", "operator", "key"), ("vera", "viewer", "token")]
    assert "removed vera" in fedtune_cmd("admin", "remove", "vera", *state, check=True).stdout
    audit = fedtune_cmd("admin", "audit", *state, "--last", "50", check=True).stdout.splitlines()
    rows = [line.split(maxsplit=5)[1:] for line in audit[1:]]  # WHO ROLE METHOD OUTCOME DETAIL
    assert ["vera", "viewer", "CreateJob", "denied", refused.stderr.strip().removeprefix("fedtune: error: ")] in rows
    assert ["kim", "operator", "CreateJob", "ok", json.dumps({"job_id": job}, separators=(",", ":"))] in rows
    assert rows[-1][:4] == ["admin.token", "admin", "RemoveAdmin", "ok"]


def test_reading_the_audit_log_returns_the_latest_matching_lines(tmp_path: Path) -> None:
    from fedtune.coordinator.audit import AuditLog

    log = AuditLog(tmp_path)
    lines = [json.dumps({"who": f"w{i % 3}", "i": i, "pad": "x" * (i % 700)}) for i in range(3000)]
    (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")  # ~1 MiB: read in many blocks from the end
    assert log.tail(5) == (lines[-5:], True)
    assert log.tail(0) == (lines, False)
    mine = [line for line in lines if '"w1"' in line]
    assert log.tail(7, "w1") == (mine[-7:], True)
    assert log.tail(5000, "w1") == (mine, False)
