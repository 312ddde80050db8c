"""Mistakes a user can make at the command line: one clear line on stderr and a stable exit code."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from fedtune.errors import ExitCode
from tests.conftest import Admin, fedtune_cmd, make_spec

pytestmark = pytest.mark.integration


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("fedtune: error:")]
    assert lines, f"no error line in stderr:\n{stderr}"
    return lines[-1]


def test_client_with_a_bad_token_exits_with_the_reason(coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    admin.create_job(make_spec())
    proc = fedtune_cmd("client", "run", "--coordinator", coordinator.address, "--token", "ftk_wrong",
                       "--data", str(fed_data[0][0]), "--state-dir", str(tmp_path / "c"), "--insecure", timeout=120)
    assert proc.returncode == ExitCode.AUTH
    assert "enrollment token is not valid" in _last_line(proc.stderr)


def test_malformed_data_is_named_with_its_line_before_joining(coordinator, admin: Admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec())
    token = admin.token(job, uses=1)
    data = tmp_path / "private.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    proc = fedtune_cmd("client", "run", "--coordinator", coordinator.address, "--token", token,
                       "--data", str(data), "--state-dir", str(tmp_path / "c"), "--insecure", timeout=120)
    assert proc.returncode == ExitCode.BAD_INPUT
    assert f"{data}:2:" in _last_line(proc.stderr)
    # The token was not spent: the client never joined.
    assert coordinator.coordinator.state.clients(job) == []


def test_job_spec_errors_name_the_key(coordinator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state_dir = str(coordinator.coordinator.state_dir)
    for text, key in (("name: x\nroundz: 3\n", "roundz"), ("training: {lr: -1}\n", "training.lr"),
                      ("peft: {r: 0}\n", "peft.r")):
        spec = tmp_path / "spec.yaml"
        spec.write_text(text)
        proc = fedtune_cmd("job", "create", str(spec), "--state-dir", state_dir)
        assert proc.returncode == ExitCode.BAD_INPUT
        assert key in _last_line(proc.stderr)
    assert coordinator.coordinator.state.jobs() == []


def test_job_init_prints_a_spec_that_job_create_accepts(coordinator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "spec.yaml"
    spec.write_text(fedtune_cmd("job", "init", check=True).stdout)
    state_dir = str(coordinator.coordinator.state_dir)
    job = fedtune_cmd("job", "create", str(spec), "--state-dir", state_dir, check=True).stdout.strip()
    listed = fedtune_cmd("job", "list", "--state-dir", state_dir, check=True).stdout
    assert job in listed and "running" in listed
    assert fedtune_cmd("job", "cancel", job, "--state-dir", state_dir, check=True).stdout.strip() == f"{job} cancelled"
    unknown = fedtune_cmd("job", "status", "job-00000000", "--state-dir", state_dir)
    assert unknown.returncode == ExitCode.BAD_INPUT and "no job" in _last_line(unknown.stderr)


def test_coordinator_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = fedtune_cmd("coordinator", "start", "--state-dir", str(tmp_path / "s"), "--port", str(port), "--insecure",
                           timeout=60)
    assert proc.returncode == ExitCode.CONFLICT
    assert f"cannot listen on 127.0.0.1:{port}" in _last_line(proc.stderr)


def test_coordinator_refuses_a_state_dir_of_another_version(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    state_dir.mkdir()
    with sqlite3.connect(state_dir / "state.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('state_format', '999'), ('written_by', '9.9.9')")
    proc = fedtune_cmd("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure", timeout=60)
    assert proc.returncode == ExitCode.CONFLICT
    line = _last_line(proc.stderr)
    assert "fedtune 9.9.9" in line and "state format 999" in line


def test_coordinator_refuses_a_state_dir_in_use(coordinator) -> None:  # type: ignore[no-untyped-def]
    proc = fedtune_cmd("coordinator", "start", "--state-dir", str(coordinator.coordinator.state_dir), "--port", "0",
                       "--insecure", timeout=60)
    assert proc.returncode == ExitCode.CONFLICT
    assert "in use by another running coordinator" in _last_line(proc.stderr)


def test_unreachable_coordinator_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = fedtune_cmd("job", "list", "--coordinator", f"127.0.0.1:{port}", "--admin-token", "x", "--insecure",
                       timeout=60)
    assert proc.returncode == ExitCode.UNAVAILABLE
    assert f"nothing is listening at 127.0.0.1:{port} (connection refused)" in _last_line(proc.stderr)


def test_coordinator_key_is_what_verifies_its_adapters(coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import base64
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedtune.crypto.keys import raw_public_bytes
    from tests.conftest import run_agents

    state_dir = str(coordinator.coordinator.state_dir)
    job = admin.create_job(make_spec(steps=2))
    run_agents(coordinator, admin, job, fed_data[0][:1], tmp_path)
    key = fedtune_cmd("coordinator", "key", "--state-dir", state_dir, check=True).stdout.strip()
    assert base64.b64decode(key) == coordinator.coordinator.keys.signing_public_key()
    # The same key through the admin API: job status (text and json) and adapters list.
    assert f"signing key: {key}" in fedtune_cmd("job", "status", job, "--state-dir", state_dir, check=True).stdout
    status = json.loads(fedtune_cmd("job", "status", job, "--state-dir", state_dir, "--format", "json",
                                    check=True).stdout)
    assert status["signing_public_key"] == key
    listed = json.loads(fedtune_cmd("adapters", "list", "--state-dir", state_dir, "--format", "json",
                                    check=True).stdout)
    assert [a["signing_public_key"] for a in listed] == [key]

    out = tmp_path / "adapter"
    fedtune_cmd("adapters", "pull", job, "--out", str(out), "--state-dir", state_dir, check=True)
    ok = fedtune_cmd("adapters", "verify", str(out), "--public-key", key)
    assert ok.returncode == 0 and "signature by the pinned key" in ok.stdout, ok.stderr
    (tmp_path / "coordinator.pub").write_text(key + "\n")
    assert fedtune_cmd("adapters", "verify", str(out), "--public-key", str(tmp_path / "coordinator.pub")).returncode == 0
    stranger = base64.b64encode(raw_public_bytes(Ed25519PrivateKey.generate())).decode()
    forged = fedtune_cmd("adapters", "verify", str(out), "--public-key", stranger)
    assert forged.returncode == ExitCode.BAD_INPUT
    assert "signed by another key than the trusted coordinator key" in _last_line(forged.stderr)


def test_coordinator_key_needs_a_coordinator_state_dir(tmp_path: Path) -> None:
    proc = fedtune_cmd("coordinator", "key", "--state-dir", str(tmp_path / "nothing"))
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "no signing key in" in _last_line(proc.stderr)
    assert not (tmp_path / "nothing").exists()  # nothing was created


def test_every_command_has_help() -> None:
    import typer
    from typer.testing import CliRunner

    from fedtune.cli.main import app

    # The installed console script, once; then every command of the tree, in this process.
    proc = fedtune_cmd("-h")
    assert proc.returncode == 0 and "Usage" in proc.stdout
    assert fedtune_cmd("--version").stdout.startswith("fedtune ")

    def commands(group, path: list[str]):  # type: ignore[no-untyped-def]
        for name, command in group.commands.items():
            yield [*path, name]
            if hasattr(command, "commands"):
                yield from commands(command, [*path, name])

    paths = list(commands(typer.main.get_command(app), []))
    assert {"demo", "simulate"} <= {p[0] for p in paths} and ["emulator", "build"] in paths
    assert ["client", "run"] in paths and ["job", "create"] in paths and ["adapters", "verify"] in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "-h"])
        assert result.exit_code == 0 and "Usage" in result.output, (path, result.output)
        help_text = result.output.split("Usage", 1)[1]
        assert len(help_text.strip().splitlines()) >= 2, (path, "no description")


def test_client_stops_cleanly_on_sigterm(coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import signal

    from tests.conftest import spawn, wait_until

    # Two clients are needed for a round, so the single agent idles in its heartbeat loop.
    job = admin.create_job(make_spec(clients=2))
    log = tmp_path / "client.log"
    proc = spawn("client", "run", "--coordinator", coordinator.address, "--token", admin.token(job),
                 "--data", str(fed_data[0][0]), "--state-dir", str(tmp_path / "c"), "--no-progress", "--insecure",
                 log=log)
    wait_until(lambda: "joined job" in log.read_text(), timeout=90, what="the client to join")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == ExitCode.INTERRUPTED
    text = log.read_text()
    assert "fedtune: interrupted" in text and "Traceback" not in text
    # Its identity is kept: a restart rejoins without a token.
    assert (tmp_path / "c" / "identity.json").exists()
