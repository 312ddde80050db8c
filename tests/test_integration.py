"""End to end through the CLI: the coordinator and every client agent are separate OS processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.client.channel import ClientTls
from fedtune.coordinator.keyring import KeyRing
from fedtune.coordinator.store import ArtifactStore
from fedtune.crypto.certs import init_certs
from fedtune.crypto.envelope import UpdateBinding
from fedtune.demo import wait_for_coordinator
from fedtune.errors import InvalidInput
from fedtune.peft_io import bytes_to_tensors
from tests.conftest import fedtune_cmd, make_spec, run_agents, spawn, wait_until

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A coordinator process plus client agent processes, all started through the CLI, over mTLS."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = root
        self.certs = init_certs(root / "certs", ["127.0.0.1"], ["operator", "client-0", "client-1", "client-2"])
        self.tls = ClientTls(self.certs.ca_cert, root / "certs" / "operator.pem", root / "certs" / "operator.key")
        self.state_dir = root / "coord"
        self.port = port
        self.procs: list[subprocess.Popen[bytes]] = []
        self.coord: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start_coordinator(self) -> str:
        log = self.root / f"coordinator-{len(self.procs)}.log"
        self.coord = spawn("coordinator", "start", "--state-dir", str(self.state_dir), "--port", str(self.port),
                           "--tls-cert", str(self.certs.server_cert), "--tls-key", str(self.certs.server_key),
                           "--client-ca", str(self.certs.ca_cert), log=log)
        self.procs.append(self.coord)
        self.address = wait_for_coordinator(self.state_dir, self.coord, self.tls, timeout=90)
        return self.address

    def admin(self, *args: str) -> str:
        return fedtune_cmd(*args, "--state-dir", str(self.state_dir), "--ca-cert", str(self.certs.ca_cert),
                           "--client-cert", str(self.tls.cert), "--client-key", str(self.tls.key), check=True).stdout

    def create_job(self, spec: str) -> str:
        path = self.root / "spec.yaml"
        path.write_text(spec)
        out = self.admin("job", "create", str(path))
        assert re.fullmatch(r"job-[0-9a-f]{8}\n", out), f"job create must print the id alone, got {out!r}"
        return out.strip()

    def start_client(self, job: str, data: Path, i: int) -> subprocess.Popen[bytes]:
        token = self.admin("token", "create", "--job", job)
        assert re.fullmatch(r"ftk_\S+\n", token)
        proc = spawn("client", "run", "--coordinator", self.address, "--token", token.strip(), "--data", str(data),
                     "--state-dir", str(self.root / f"client-{i}"), "--no-progress", "--device", "cpu",
                     "--ca-cert", str(self.certs.ca_cert), "--client-cert", str(self.root / "certs" / f"client-{i}.pem"),
                     "--client-key", str(self.root / "certs" / f"client-{i}.key"), log=self.root / f"client-{i}.log")
        self.procs.append(proc)
        return proc

    def status(self, job: str) -> dict:
        return json.loads(self.admin("job", "status", job, "--format", "json"))

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.state_dir / 'state.db'}?mode=ro", uri=True)

    def log(self, name: str) -> str:
        return (self.root / name).read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, port=_free_port())
    yield c
    c.close()


def signing_key(cluster: Cluster) -> str:
    """The coordinator's manifest-signing public key, read through the admin API."""
    import base64

    from fedtune.cli.admin_client import AdminClient
    from fedtune.protos import fedtune_pb2 as pb

    admin = AdminClient(cluster.address, (cluster.state_dir / "admin.token").read_text().strip(), cluster.tls)
    return base64.b64encode(admin.call("GetInfo", pb.GetInfoRequest()).signing_public_key).decode()  # type: ignore[attr-defined]


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float = 240) -> int:
    return proc.wait(timeout=timeout)


def test_two_clients_two_rounds_publish_an_adapter_plain_peft_loads(cluster: Cluster, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    cluster.start_coordinator()
    job = cluster.create_job(make_spec(eval_file, steps=15, rounds=2, clients=2))
    agents = [cluster.start_client(job, clients[i], i) for i in range(2)]
    for i, a in enumerate(agents):
        assert _wait_exit(a) == 0, cluster.log(f"client-{i}.log")[-3000:]

    status = cluster.status(job)
    assert status["state"] == "finished"
    assert [r["contributors"] for r in status["history"]] == [2, 2]
    base_loss = status["base_metrics"]["eval_loss"]
    last = status["history"][-1]["metrics"]
    assert last["eval_loss"] < base_loss
    assert last["bytes_up"] > 0 and status["history"][0]["metrics"]["bytes_down"] > last["bytes_down"]

    listed = json.loads(cluster.admin("adapters", "list", "--format", "json"))
    assert [(a["job"], a["round"]) for a in listed] == [(job, 1), (job, 2)]

    out = tmp_path / "pulled"
    assert cluster.admin("adapters", "pull", job, "--out", str(out)).strip() == str(out)
    verified = fedtune_cmd("adapters", "verify", str(out), "--public-key", signing_key(cluster))
    assert verified.returncode == 0, verified.stderr
    # One changed byte in the adapter, or in the manifest, and verification fails naming it.
    weights_file = out / "adapter_model.safetensors"
    original = weights_file.read_bytes()
    weights_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    broken = fedtune_cmd("adapters", "verify", str(out))
    assert broken.returncode == 3 and "adapter_model.safetensors does not match" in broken.stderr
    weights_file.write_bytes(original)
    manifest_file = out / "fedtune.json"
    text = manifest_file.read_text()
    manifest_file.write_text(text.replace('"contributors": 2', '"contributors": 3'))
    broken = fedtune_cmd("adapters", "verify", str(out))
    assert broken.returncode == 3 and "signature does not verify" in broken.stderr
    manifest_file.write_text(text)
    manifest = json.loads((out / "fedtune.json").read_text())
    assert manifest["round"] == 2 and manifest["contributors"] == 2 and manifest["job"] == job

    # Plain peft loads the pulled directory onto the base named in its manifest.
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest["base_model"]), str(out))
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    # ... and the change is exactly W + (alpha / r) * B @ A on each target module.
    weights = load_file(str(out / "adapter_model.safetensors"))
    scale = manifest["peft"]["alpha"] / manifest["peft"]["r"]
    merged = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    modules = dict(merged.named_modules())
    for key, a in weights.items():
        if key.endswith("lora_A.weight"):
            b = weights[key.replace("lora_A", "lora_B")]
            module = modules[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
            module.weight.data += scale * b @ a
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned_logits, atol=1e-4, rtol=1e-4)

    # The published round-2 adapter is round 1's plus the example-weighted mean of round 2's deltas.
    db = cluster.db()
    blobs = cluster.state_dir / "blobs"
    read = lambda sha: bytes_to_tensors((blobs / sha[:2] / sha).read_bytes())
    g_in, g_out = db.execute("SELECT global_in, global_out FROM rounds WHERE job_id=? AND round=2", (job,)).fetchone()
    ups = db.execute("SELECT sha256, num_examples, client_id, update_id FROM updates WHERE job_id=? AND round=2",
                     (job,)).fetchall()
    assert len(ups) == 2
    total = sum(n for _, n, _, _ in ups)
    expected = {k: v.clone() for k, v in read(g_in).items()}
    keys = KeyRing(cluster.state_dir / "keys")
    for sha, n, client_id, update_id in ups:
        sealed = (blobs / sha[:2] / sha).read_bytes()
        # Stored sealed: only the job's key opens it, for exactly this job, round, client and update.
        with pytest.raises(InvalidInput):
            bytes_to_tensors(sealed)
        plain = keys.open_update(sealed, UpdateBinding(job, 2, client_id, update_id))
        for k, d in bytes_to_tensors(plain).items():
            expected[k] += d * (n / total)
    for k, v in read(g_out).items():
        torch.testing.assert_close(v, expected[k])
        torch.testing.assert_close(weights[k], v)

    # Private data never reached the coordinator: no blob and no log line holds a training example.
    secret = json.loads(clients[0].read_text().splitlines()[0])["prompt"]
    assert len(secret) >= 8
    for blob in blobs.rglob("*"):
        if blob.is_file():
            assert secret.encode() not in blob.read_bytes()
    assert secret not in cluster.log("coordinator-0.log")

    assert cluster.coord is not None
    cluster.coord.send_signal(signal.SIGTERM)
    assert cluster.coord.wait(timeout=30) == 0


def test_client_killed_mid_round_round_closes_at_deadline(cluster: Cluster, fed_data) -> None:  # type: ignore[no-untyped-def]
    clients, _ = fed_data
    cluster.start_coordinator()
    job = cluster.create_job(make_spec(steps=10, rounds=1, clients=3, min_clients=2, deadline=20, cohort_wait=30))
    agents = [cluster.start_client(job, clients[i], i) for i in range(3)]
    wait_until(lambda: "round 1: task" in cluster.log("client-2.log"), timeout=120, what="client-2's task")
    agents[2].send_signal(signal.SIGKILL)
    for i in (0, 1):
        assert _wait_exit(agents[i]) == 0, cluster.log(f"client-{i}.log")[-3000:]
    status = cluster.status(job)
    assert status["state"] == "finished"
    (rnd,) = status["history"]
    assert rnd["cohort"] == 3 and rnd["contributors"] == 2
    # It closed at the deadline, not before.
    assert rnd["metrics"]["seconds"] >= 19


@pytest.mark.slow
def test_coordinator_killed_mid_round_resumes_without_losing_or_doubling_updates(cluster: Cluster, fed_data) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    cluster.start_coordinator()
    job = cluster.create_job(make_spec(eval_file, steps=30, rounds=3, clients=2, min_clients=2))
    agents = [cluster.start_client(job, clients[i], i) for i in range(2)]

    def first_update_of_round_2() -> list[str]:
        with cluster.db() as db:
            return [r[0] for r in db.execute("SELECT update_id FROM updates WHERE job_id=? AND round=2", (job,))]

    accepted = wait_until(first_update_of_round_2, timeout=180, interval=0.05, what="an update in round 2")
    assert cluster.coord is not None
    cluster.coord.send_signal(signal.SIGKILL)
    cluster.coord.wait()
    cluster.start_coordinator()  # same state dir, same port: the clients find it again by themselves
    for i, a in enumerate(agents):
        assert _wait_exit(a) == 0, cluster.log(f"client-{i}.log")[-3000:]
    status = cluster.status(job)
    assert status["state"] == "finished"
    assert [r["contributors"] for r in status["history"]] == [2, 2, 2]
    with cluster.db() as db:
        round2 = [r[0] for r in db.execute("SELECT update_id FROM updates WHERE job_id=? AND round=2", (job,))]
        per_client = db.execute("SELECT COUNT(*) FROM updates WHERE job_id=? GROUP BY client_id", (job,)).fetchall()
    assert set(accepted) <= set(round2) and len(round2) == 2
    assert [n for (n,) in per_client] == [3, 3]
    assert "unreachable" in cluster.log("client-0.log") + cluster.log("client-1.log")


def test_agents_aggregate_securely_with_differential_privacy(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    spec = make_spec(eval_file, steps=5, rounds=2, clients=4, min_clients=3, cohort_wait=60) + (
        "secure_aggregation: {degree: 2, threshold: 2, clip: 0.5, phase_seconds: 30}\n"
        "privacy: {clip_norm: 0.5, noise_multiplier: 0.8, delta: 1.0e-5}\n")
    job = admin.create_job(spec)
    run_agents(coordinator, admin, job, clients[:4], tmp_path)
    state = coordinator.coordinator.state
    assert state.job(job).state == "finished"
    rounds = state.rounds(job)
    assert [r.metrics["contributors"] for r in rounds] == [4, 4]
    # The accountant's epsilon grows round over round, and is in each published manifest.
    eps = [r.metrics["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]
    manifest = json.loads(state.published(job)[-1][3])
    assert manifest["metrics"]["epsilon"] == pytest.approx(eps[1])
    # Every stored update is a sealed masked vector: no plain delta ever reached the coordinator.
    for u in state.updates(job, 2):
        assert u.codec == "secagg"


def test_agents_send_compressed_updates_with_error_feedback(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    fp32_bytes = len(coordinator.coordinator.store.read(
        coordinator.coordinator.state.job(admin.create_job(make_spec())).initial_adapter))
    job = admin.create_job(make_spec(eval_file, steps=5, rounds=2, clients=2).replace(
        "rounds: 2", "rounds: 2\ncodec: topk:0.1"))
    run_agents(coordinator, admin, job, clients[:2], tmp_path)
    state = coordinator.coordinator.state
    assert state.job(job).state == "finished"
    for r in state.rounds(job):
        per_client = r.metrics["bytes_up"] / r.metrics["contributors"]
        assert per_client < fp32_bytes / 3, (per_client, fp32_bytes)  # safetensors headers weigh on a tiny adapter
    # What top-k left out is carried over, on disk, for the next round.
    for i in range(2):
        assert (tmp_path / f"c{i}" / "feedback" / f"{job}.safetensors").exists()
    assert state.rounds(job)[-1].metrics["eval_loss"] < json.loads(state.job(job).base_eval_json)["eval_loss"]


def test_a_qlora_agent_trains_on_an_nf4_base(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    job = admin.create_job(make_spec(eval_file, steps=20, rounds=1, clients=1).replace(
        "rounds: 1", "rounds: 1\nclient_quantization: nf4"))
    run_agents(coordinator, admin, job, clients[:1], tmp_path)
    state = coordinator.coordinator.state
    (rnd,) = state.rounds(job)
    assert rnd.metrics["contributors"] == 1
    # Trained on the 4-bit base, evaluated on the full-precision one: the adapter still helps.
    assert rnd.metrics["eval_loss"] < json.loads(state.job(job).base_eval_json)["eval_loss"]


@pytest.mark.slow
def test_coordinator_killed_mid_job_under_fedadam_ends_as_an_uninterrupted_run(tmp_path: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    """FedAdam's moments are durable with each round: a coordinator SIGKILLed after round 1 resumes
    with them, and the final adapter equals an uninterrupted run's."""
    clients, eval_file = fed_data
    spec = (make_spec(eval_file, steps=10, rounds=3, clients=2, min_clients=2)
            + "aggregation: {strategy: fedadam, options: {server_lr: 0.01}}\n")
    finals, moments = [], []
    for kill in (False, True):
        c = Cluster(tmp_path / ("killed" if kill else "whole"), port=_free_port())
        try:
            c.start_coordinator()
            job = c.create_job(spec)
            agents = [c.start_client(job, clients[i], i) for i in range(2)]
            if kill:
                def round_1_state(c: Cluster = c, job: str = job) -> bool:
                    with c.db() as db:
                        return db.execute("SELECT 1 FROM strategy_states WHERE job_id=? AND round=1",
                                          (job,)).fetchone() is not None

                wait_until(round_1_state, timeout=180, interval=0.05, what="round 1's FedAdam state")
                assert c.coord is not None
                c.coord.send_signal(signal.SIGKILL)
                c.coord.wait()
                c.start_coordinator()
            for i, a in enumerate(agents):
                assert _wait_exit(a) == 0, c.log(f"client-{i}.log")[-3000:]
            assert c.status(job)["state"] == "finished"
            finals.append(bytes_to_tensors((c.state_dir / "adapters" / job / "round-3" /
                                            "adapter_model.safetensors").read_bytes()))
            with c.db() as db:
                sha = db.execute("SELECT sha256 FROM strategy_states WHERE job_id=? AND round=3", (job,)).fetchone()[0]
            moments.append(bytes_to_tensors(ArtifactStore(c.state_dir / "blobs").read(sha)))
        finally:
            c.close()
    whole, killed = finals
    assert whole.keys() == killed.keys()
    for k in whole:
        assert torch.allclose(whole[k], killed[k], atol=1e-6), k
    assert moments[0].keys() == moments[1].keys() and any(k.startswith("v/") for k in moments[0])
    for k in moments[0]:
        assert torch.allclose(moments[0][k], moments[1][k], rtol=1e-6, atol=1e-12), k


@pytest.mark.slow
def test_coordinator_killed_mid_job_in_async_mode_loses_and_doubles_no_update(cluster: Cluster, fed_data) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    cluster.start_coordinator()
    job = cluster.create_job(make_spec(eval_file, steps=10, rounds=4, clients=3, min_clients=2)
                             + "aggregation: {mode: async, async: {buffer: 2}}\n")
    agents = [cluster.start_client(job, clients[i], i) for i in range(3)]

    def version_2_published() -> bool:
        with cluster.db() as db:
            return db.execute("SELECT 1 FROM rounds WHERE job_id=? AND round=2 AND state='published'",
                              (job,)).fetchone() is not None

    wait_until(version_2_published, timeout=180, interval=0.05, what="version 2")
    assert cluster.coord is not None
    cluster.coord.send_signal(signal.SIGKILL)
    cluster.coord.wait()
    cluster.start_coordinator()
    for i, a in enumerate(agents):
        assert _wait_exit(a) == 0, cluster.log(f"client-{i}.log")[-3000:]
    status = cluster.status(job)
    assert status["state"] == "finished"
    with cluster.db() as db:
        rows = db.execute("SELECT update_id, round FROM updates WHERE job_id=?", (job,)).fetchall()
    ids = [u for u, _ in rows]
    assert len(ids) == len(set(ids))
    assert sum(h["metrics"]["contributors"] for h in status["history"]) == len(rows)
    assert all(h["metrics"]["contributors"] >= 2 for h in status["history"])
