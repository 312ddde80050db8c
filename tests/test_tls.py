"""TLS by default, mTLS as an option, plaintext only when asked for."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedtune.client.channel import ClientTls, open_channel
from fedtune.coordinator.server import start
from fedtune.coordinator.tls import ServerTls
from fedtune.crypto.certs import init_certs
from fedtune.errors import ExitCode, InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from tests.conftest import fedtune_cmd


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    good = init_certs(tmp_path / "good", ["127.0.0.1"], ["client"])
    other = init_certs(tmp_path / "other", ["127.0.0.1"], ["client"])
    return good, other


def _list_jobs(address: str, tls: ClientTls, token: str) -> grpc.StatusCode | None:
    channel = open_channel(address, tls)
    try:
        pb_grpc.AdminServiceStub(channel).ListJobs(pb.ListJobsRequest(), metadata=[("x-fedtune-admin", token)],
                                                   timeout=10)
        return None
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def test_mtls_refuses_clients_without_a_certificate_from_its_ca(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    good, other = pki
    running = start(tmp_path / "coord", "127.0.0.1", 0,
                    tls=ServerTls(good.server_cert, good.server_key, client_ca=good.ca_cert))
    try:
        token = (running.coordinator.state_dir / "admin.token").read_text().strip()
        ok = ClientTls(good.ca_cert, good.client_cert, good.client_key)
        assert _list_jobs(running.address, ok, token) is None
        # A client certificate from another CA, no client certificate, or plaintext: refused.
        assert _list_jobs(running.address, ClientTls(good.ca_cert, other.client_cert, other.client_key), token) \
            == grpc.StatusCode.UNAVAILABLE
        assert _list_jobs(running.address, ClientTls(good.ca_cert), token) == grpc.StatusCode.UNAVAILABLE
        assert _list_jobs(running.address, ClientTls(insecure=True), token) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0.5)


def test_client_refuses_a_coordinator_whose_certificate_does_not_verify(tmp_path: Path, pki, fed_data) -> None:  # type: ignore[no-untyped-def]
    good, other = pki
    running = start(tmp_path / "coord", "127.0.0.1", 0, tls=ServerTls(good.server_cert, good.server_key))
    try:
        token = (running.coordinator.state_dir / "admin.token").read_text().strip()
        assert _list_jobs(running.address, ClientTls(good.ca_cert), token) is None
        assert _list_jobs(running.address, ClientTls(other.ca_cert), token) == grpc.StatusCode.UNAVAILABLE
        # The agent names the failure and exits instead of retrying forever.
        proc = fedtune_cmd("client", "run", "--coordinator", running.address, "--token", "ftk_x",
                           "--data", str(fed_data[0][0]), "--state-dir", str(tmp_path / "c"),
                           "--ca-cert", str(other.ca_cert), timeout=120)
        assert proc.returncode == ExitCode.AUTH
        assert "TLS with coordinator" in proc.stderr
    finally:
        running.stop(grace=0.5)


def test_plaintext_needs_an_explicit_insecure(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="TLS is required"):
        start(tmp_path / "coord", "127.0.0.1", 0)
    proc = fedtune_cmd("coordinator", "start", "--state-dir", str(tmp_path / "c2"), "--port", "0", timeout=60)
    assert proc.returncode == ExitCode.BAD_INPUT and "TLS is required" in proc.stderr


def test_certs_init_writes_a_usable_pki(tmp_path: Path) -> None:
    proc = fedtune_cmd("certs", "init", "--out", str(tmp_path / "pki"), "--host", "coord.example", "--client", "a",
                       check=True)
    assert "--tls-cert" in proc.stdout
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "a.pem", "a.key"):
        assert (tmp_path / "pki" / name).exists()
    assert oct((tmp_path / "pki" / "server.key").stat().st_mode & 0o777) == "0o600"
