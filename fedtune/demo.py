"""`fedtune demo`: a coordinator and client agents as separate processes on loopback.

Each client gets its own private, non-IID synthetic data; the demo creates a job on the tiny
preset, follows it round by round, and ends with the eval loss of the base vs the published adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtune.cli.admin_client import AdminClient
from fedtune.client.channel import ClientTls, open_channel
from fedtune.crypto.certs import init_certs
from fedtune.data import write_synthetic_federation
from fedtune.errors import FedtuneError, Unavailable
from fedtune.protos import fedtune_pb2 as pb
from fedtune.report import HEADER, round_row

DEMO_TIMEOUT_SECONDS = 900

DEMO_SPEC = """\
name: demo
base_model: tiny-llama
# lm_head too: the preset is random-init, so attention-only LoRA barely moves its outputs.
peft: {{method: lora, r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj, lm_head]}}
training: {{steps: 30, lr: 0.005, batch_size: 8, max_seq_len: 64, seed: 0}}
rounds: {rounds}
clients_per_round: {clients}
min_clients: {min_clients}
round_deadline_seconds: 300
cohort_wait_seconds: 20
eval_data: {eval_data}
"""


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_for_coordinator(state_dir: Path, proc: subprocess.Popen[bytes], tls: ClientTls,
                         timeout: float = 120.0) -> str:
    """Waits until a coordinator started on ``state_dir`` answers health checks; returns its address."""
    deadline = time.time() + timeout
    address_file = state_dir / "coordinator.json"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"coordinator exited with code {proc.returncode} before it was ready")
        if address_file.exists():
            address = json.loads(address_file.read_text())["address"]
            channel = open_channel(address, tls)
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return address
            except grpc.RpcError:
                pass
            finally:
                channel.close()
        time.sleep(0.2)
    raise Unavailable(f"coordinator did not become ready within {timeout:.0f}s")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


DEFAULT_OUT = "fedtune-demo"


def default_out_dir(cwd: Path) -> Path:
    """Where a demo without --out keeps its files: ./fedtune-demo, else the first free ./fedtune-demo-N."""
    for n in range(1, 1000):
        candidate = cwd / (DEFAULT_OUT if n == 1 else f"{DEFAULT_OUT}-{n}")
        if not candidate.exists():
            return candidate
    raise FedtuneError(f"{cwd} already holds 999 demo directories; pass --out DIR")


def run_demo(out: Path | None, n_clients: int, rounds: int, secure: bool = False) -> None:
    """Runs the demo and keeps what it made (the published adapter above all) in ``out``, by default
    a new ./fedtune-demo directory; raises FedtuneError when something does not work."""
    root = (out if out is not None else default_out_dir(Path.cwd())).resolve()
    if (root / "coordinator").exists():
        raise FedtuneError(f"{root} already holds a demo; pass an empty or new --out directory")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    client_files, eval_file = write_synthetic_federation(root / "data", n_clients)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"fedtune demo: {n_clients} clients, {rounds} rounds, tiny-llama preset, working in {root}", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    coordinator_dir = root / "coordinator"
    # mTLS on loopback too: the demo runs the same transport a deployment would.
    names = [f"client-{i}" for i in range(n_clients)]
    certs = init_certs(root / "certs", ["localhost", "127.0.0.1"], ["operator", *names])
    cert_dir = certs.ca_cert.parent
    coord = _spawn(["coordinator", "start", "--state-dir", str(coordinator_dir), "--port", "0",
                    "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                    "--client-ca", str(certs.ca_cert)], logs / "coordinator.log", env)
    operator_tls = ClientTls(certs.ca_cert, cert_dir / "operator.pem", cert_dir / "operator.key")
    try:
        address = wait_for_coordinator(coordinator_dir, coord, operator_tls)
        admin = AdminClient(address, (coordinator_dir / "admin.token").read_text().strip(), operator_tls)
        if secure and n_clients < 3:
            raise FedtuneError("--secure needs at least 3 clients")
        # SecAgg+ wants every cohort to hold the graph's degree: wait for all clients then.
        min_clients = n_clients if secure else max(1, n_clients - 1)
        spec = DEMO_SPEC.format(rounds=rounds, clients=n_clients, min_clients=min_clients,
                                eval_data=json.dumps(str(eval_file)))
        if secure:
            degree = min(8, (n_clients - 1) // 2 * 2)  # even, below min_clients
            spec += f"secure_aggregation: {{degree: {degree}, threshold: {degree // 2 + 1}, clip: 0.5}}\n"
        status = admin.call("CreateJob", pb.CreateJobRequest(spec_yaml=spec))
        job_id = status.job_id  # type: ignore[attr-defined]
        mode = "SecAgg+: the coordinator sees only sums" if secure else "updates sealed to the job's X25519 key"
        print(f"coordinator {address} (mTLS, {mode}), job {job_id}", flush=True)
        for i, data in enumerate(client_files):
            token = admin.call("CreateToken", pb.CreateTokenRequest(job_id=job_id, uses=1)).token  # type: ignore[attr-defined]
            procs.append(_spawn(
                ["client", "run", "--coordinator", address, "--token", token, "--data", str(data),
                 "--state-dir", str(root / "clients" / f"client-{i}"), "--name", f"client-{i}",
                 "--device", "cpu", "--no-progress", "--ca-cert", str(certs.ca_cert),
                 "--client-cert", str(cert_dir / f"client-{i}.pem"), "--client-key", str(cert_dir / f"client-{i}.key")],
                logs / f"client-{i}.log", env,
            ))
        _follow(admin, job_id, procs, logs)
        final = admin.call("GetJob", pb.GetJobRequest(job_id=job_id))
        base = json.loads(final.base_metrics_json or "{}")  # type: ignore[attr-defined]
        last = json.loads(final.history[-1].metrics_json)  # type: ignore[attr-defined]
        adapters = admin.call("ListAdapters", pb.ListAdaptersRequest(job_id=job_id)).adapters  # type: ignore[attr-defined]
        drop = 100.0 * (base["eval_loss"] - last["eval_loss"]) / base["eval_loss"]
        print(f"\neval loss on held-out data: base {base['eval_loss']:.4f} -> published adapter "
              f"{last['eval_loss']:.4f} ({drop:.1f}% lower)")
        print(f"published adapter: {adapters[-1].path}")
        print(_load_hint(coordinator_dir, final.base_model, adapters[-1].path))  # type: ignore[attr-defined]
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.terminate()
    finally:
        for p in [*procs, coord]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*procs, coord]:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"state dir, logs, data and adapters kept in {root} (delete it when done)")


def _load_hint(coordinator_dir: Path, base_model: str, adapter: str) -> str:
    # A preset base is an ordinary model directory under the coordinator's state dir.
    preset = coordinator_dir / "models" / "presets" / base_model
    base = str(preset) if preset.is_dir() else base_model
    return ("load it with plain peft:\n"
            "  from peft import PeftModel\n"
            "  from transformers import AutoModelForCausalLM\n"
            f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r})")


def _follow(admin: AdminClient, job_id: str, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    started = time.time()
    shown = 0
    header = False
    while True:
        status = admin.call("GetJob", pb.GetJobRequest(job_id=job_id))
        if not header:
            base = json.loads(status.base_metrics_json or "{}")  # type: ignore[attr-defined]
            if "eval_loss" in base:
                print(f"base model eval loss: {base['eval_loss']:.4f}\n{HEADER}", flush=True)
                header = True
        for r in status.history:  # type: ignore[attr-defined]
            if r.state == "published" and r.round > shown and header:
                print(round_row(r.round, json.loads(r.metrics_json)), flush=True)
                shown = r.round
        state = status.state  # type: ignore[attr-defined]
        if state == "finished" and shown >= status.rounds:  # type: ignore[attr-defined]
            return
        if state in ("failed", "cancelled"):
            raise FedtuneError(f"job {job_id} {state}: {status.message}")  # type: ignore[attr-defined]
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0):
                raise FedtuneError(f"client-{i} exited with code {p.returncode}:\n{_tail(logs / f'client-{i}.log')}")
        if time.time() - started > DEMO_TIMEOUT_SECONDS:
            raise FedtuneError(f"demo did not finish within {DEMO_TIMEOUT_SECONDS}s; logs in {logs}")
        time.sleep(0.5)
