"""TLS by default, mTLS as an option, plaintext only when asked for."""

from __future__ import annotations

import re
import socket
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
        assert "its certificate is not signed by --ca-cert" in proc.stderr
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


# gRPC's C-core log lines: "E1203 10:00:00.123456  1234 ssl_transport_security.cc:1234] ...".
_GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]", re.MULTILINE)


def _admin_error(*args: str) -> tuple[int, str]:
    """Runs `fedtune job list` with ``args``; (exit code, its one stderr line)."""
    proc = fedtune_cmd("job", "list", "--admin-token", "x", *args, timeout=60)
    assert not _GRPC_LOG_LINE.search(proc.stderr), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), proc.stderr
    return proc.returncode, lines[0]


@pytest.fixture
def three_coordinators(tmp_path: Path, pki):  # type: ignore[no-untyped-def]
    """A plaintext, a TLS and an mTLS coordinator, all signed by the ``good`` CA."""
    good, _ = pki
    running = {
        "plain": start(tmp_path / "plain", "127.0.0.1", 0, insecure=True),
        "tls": start(tmp_path / "tls", "127.0.0.1", 0, tls=ServerTls(good.server_cert, good.server_key)),
        "mtls": start(tmp_path / "mtls", "127.0.0.1", 0,
                      tls=ServerTls(good.server_cert, good.server_key, client_ca=good.ca_cert)),
    }
    yield {name: r.address for name, r in running.items()}
    for r in running.values():
        r.stop(grace=0.2)


def test_admin_commands_say_what_is_wrong_with_the_connection(three_coordinators, pki) -> None:  # type: ignore[no-untyped-def]
    good, other = pki
    addr = three_coordinators
    cases = [
        # (coordinator, flags, exit code, what the line must say)
        ("plain", ["--ca-cert", str(good.ca_cert)], ExitCode.AUTH,
         f"the coordinator at {addr['plain']} speaks plaintext, not TLS: pass --insecure"),
        ("tls", ["--ca-cert", str(other.ca_cert)], ExitCode.AUTH,
         f"TLS handshake with {addr['tls']} failed: its certificate is not signed by --ca-cert {other.ca_cert}"),
        ("tls", ["--insecure"], ExitCode.AUTH, "speaks TLS: pass --ca-cert FILE"),
        ("mtls", ["--ca-cert", str(good.ca_cert)], ExitCode.AUTH,
         (f"the coordinator at {addr['mtls']} requires a client certificate (mTLS): pass --client-cert FILE "
          "--client-key FILE")),
        ("mtls", ["--ca-cert", str(good.ca_cert), "--client-cert", str(other.client_cert),
                  "--client-key", str(other.client_key)], ExitCode.AUTH, "refused the client certificate"),
    ]
    for name, flags, code, says in cases:
        rc, line = _admin_error("--coordinator", addr[name], *flags)
        assert (rc, says in line) == (code, True), (name, flags, line)
    # The right flags get through to the admin API, whose own answer is unchanged.
    rc, line = _admin_error("--coordinator", addr["tls"], "--ca-cert", str(good.ca_cert))
    assert rc == ExitCode.AUTH and "admin token missing or wrong" in line


def test_admin_command_against_a_closed_port_says_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, line = _admin_error("--coordinator", f"127.0.0.1:{port}", "--insecure")
    assert rc == ExitCode.UNAVAILABLE
    assert f"nothing is listening at 127.0.0.1:{port} (connection refused)" in line


def test_connection_problem_names_a_timeout() -> None:
    # A socket that listens but never accepts: the handshake hangs until the deadline.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        channel = open_channel(address, ClientTls(insecure=True))
        try:
            pb_grpc.AdminServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=1)
        except grpc.RpcError as e:
            problem = ClientTls(insecure=True).diagnose(e, address)
            message = problem.message if problem is not None else None
        finally:
            channel.close()
    assert message is not None and "(timed out)" in message and address in message
