"""Peers that connect and never read cost a bounded amount and are dropped (issue 13's bad input).

The coordinator's limits are minutes in production (fedtune.coordinator.server.SERVER_OPTIONS);
here they are cut to seconds, the mechanism is the same.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import fedtune.coordinator.server as server
from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from tests.conftest import Admin, llama_base, make_spec
from tests.test_rpc_contract import RawClient

HANDSHAKE_S, IDLE_S, AGE_S, GRACE_S = 1.0, 2.0, 4.0, 1.0
# The HTTP/2 client preface and an empty SETTINGS frame: a connection that then asks for nothing.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture
def limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningCoordinator]:
    options = dict(server.SERVER_OPTIONS)
    options.update({"grpc.server_handshake_timeout_ms": int(HANDSHAKE_S * 1000),
                    "grpc.max_connection_idle_ms": int(IDLE_S * 1000),
                    "grpc.max_connection_age_ms": int(AGE_S * 1000),
                    "grpc.max_connection_age_grace_ms": int(GRACE_S * 1000)})
    monkeypatch.setattr(server, "SERVER_OPTIONS", list(options.items()))
    running = start(tmp_path / "coord", "127.0.0.1", 0, insecure=True, workers=2)
    yield running
    running.stop(grace=0.5)


def _seconds_until_closed(sock: socket.socket, limit: float = 30.0) -> float:
    """Reads (and drops) whatever the server sends until it closes the connection."""
    start_at = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(65536):
        pass
    return time.monotonic() - start_at


def test_a_peer_that_connects_and_says_nothing_is_dropped(limited: RunningCoordinator) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as silent:
        assert _seconds_until_closed(silent) < HANDSHAKE_S + IDLE_S + 5
    with socket.create_connection(("127.0.0.1", limited.port)) as idle:
        idle.sendall(PREFACE)
        took = _seconds_until_closed(idle)
        assert IDLE_S * 0.5 < took < IDLE_S + 5


@pytest.fixture(scope="module")
def base12mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block Llama whose weights file (~12 MB) is far larger than what HTTP/2 flow control lets
    a sender put in flight to a reader that never reads."""
    return llama_base(tmp_path_factory.mktemp("base12mb"), hidden_size=384, intermediate_size=768,
                      num_hidden_layers=2)


def test_downloads_never_read_hold_no_thread_and_end_with_the_connection_age(
        limited: RunningCoordinator, base12mb: Path) -> None:
    admin = Admin(limited)
    try:
        job = admin.create_job(make_spec(clients=1).replace("base_model: tiny-llama", f"base_model: {base12mb}"))
        client = RawClient(limited.address, admin.token(job))
        ref = max(client.task().base_files, key=lambda f: f.size)
        assert ref.size > 10_000_000
        # Four streams opened and never read, on a coordinator with 2 pool threads, over a channel
        # that does not grow its flow-control window on its own.
        reader = grpc.insecure_channel(limited.address, options=[("grpc.http2.bdp_probe", 0)])
        stub = pb_grpc.ClientServiceStub(reader)
        stalled = [stub.Download(pb.DownloadRequest(sha256=ref.sha256), metadata=client.md("Download"))
                   for _ in range(4)]
        time.sleep(0.5)
        began = time.monotonic()
        assert admin.job(job).job_id == job  # a blocking call still has a thread to run on
        assert time.monotonic() - began < 5
        time.sleep(AGE_S + GRACE_S + 1)
        # The connection was recycled: each stream ends in an error, short of the file.
        for stream in stalled:
            got = 0
            with pytest.raises(grpc.RpcError):
                for chunk in stream:
                    got += len(chunk.data)
            assert got < ref.size
        # And the client goes on over a new connection.
        assert len(client.download(ref.sha256)) == ref.size
        reader.close()
    finally:
        admin.channel.close()
