"""How many clients one coordinator holds: connected idle clients, and a burst of uploads.

The coordinator runs as its own OS process (``python -m fedtune coordinator start --in-process``),
started by this script on a fresh state dir. The clients are asyncio tasks in this one process
(grpc.aio), each with its own TCP connection and Ed25519 identity, speaking the real client
protocol the way the agent does: Join with an enrollment token, then calls signed per request
(``fedtune.crypto.requests.sign_request``), uploads as header + 1 MiB chunks + commit of an
envelope sealed to the job's key.

Idle phase: clients join one job whose single round has a cohort of one, so every other client is
told to WAIT and polls at the interval the coordinator gives (``retry_after_seconds``, else the
JoinReply's ``heartbeat_seconds``). The population grows step by step (200, 1000, 2000); at each
step the heartbeat latency (p50/p99), errors, the coordinator's CPU% and RSS are measured over a
window. ``--long-poll S`` sends ``wait_seconds=S``: a coordinator that honours it holds a call
while there is nothing to do, and the client polls again as soon as it is answered. A held call's
time is the hold, not an answer's latency: with ``--long-poll``, ``--probes K`` more clients
plain-poll (``wait_seconds=0``) once a second among the held population, and the latencies
reported are theirs (the held calls are counted apart: ``held``).

Delivery phase (``--deliver N``): a coordinator of its own, one job whose round needs N + 1
clients; N clients hold long-polls (or plain-poll, without ``--long-poll``), then one more joins
and the round opens. Measured: from the round's ``opened`` time (read from the coordinator's
database) to each of the N clients receiving its TRAIN answer (p50/p99/max).

Upload phase: a second coordinator, one job with a cohort of ``--uploads`` clients and a LoRA
adapter of about 1.2 MB (tiny-llama, r=59 on all seven projections); every client gets its task,
then all of them upload at the same instant. Counted: accepted acknowledgements, errors, and
acknowledged updates missing from the coordinator's database afterwards (lost; must be 0).

    python benchmarks/load_clients.py --clients 200,1000,2000 --uploads 200 --out benchmarks/out/load_clients
    python benchmarks/load_clients.py --clients 200,1000,2000 --long-poll 20 --deliver 2000 --uploads 0

Prints markdown tables and writes ``OUT/load_clients.json`` and ``OUT/load_clients.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.client.transfer import upload_messages
from fedtune.crypto.envelope import SCHEME as ENVELOPE_SCHEME
from fedtune.crypto.envelope import UpdateBinding, seal
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.strategies import CLIENT_FEATURES

_SVC = "/fedtune.v1.ClientService/"
# Each simulated client gets its own TCP connection, as separate agents would: without a local
# subchannel pool, gRPC shares one connection among channels to the same target.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 8 << 20)]

IDLE_SPEC = """\
name: load
base_model: tiny-llama
peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
training: {steps: 1, lr: 0.01, batch_size: 8, max_seq_len: 48}
rounds: 1
clients_per_round: 1
min_clients: 1
round_deadline_seconds: 3600
cohort_wait_seconds: 0
"""



def deliver_spec(n: int) -> str:
    """The idle job, except that its round needs ``n`` clients (the last to join opens it)."""
    return IDLE_SPEC.replace("clients_per_round: 1\nmin_clients: 1", f"clients_per_round: {n}\nmin_clients: {n}")

# r=59 on all seven projections of tiny-llama: 59 * 5120 fp32 parameters, about 1.2 MB per update.
UPLOAD_SPEC = """\
name: load-uploads
base_model: tiny-llama
peft: {{r: 59, alpha: 59, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
training: {{steps: 1, lr: 0.01, batch_size: 8, max_seq_len: 48}}
rounds: 1
clients_per_round: {n}
min_clients: {n}
round_deadline_seconds: 3600
cohort_wait_seconds: 0
"""


# ---------------------------------------------------------------------- the coordinator process
class CoordinatorProcess:
    """A coordinator started with the CLI on a fresh state dir, with an admin stub."""

    def __init__(self, state_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "coordinator", "start", "--state-dir", str(state_dir), "--port", "0",
             "--insecure", "--in-process"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.address = self._wait_address(log_path)
        self.admin_md = [("x-fedtune-admin", (state_dir / "admin.token").read_text().strip())]
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.admin = pb_grpc.AdminServiceStub(self.channel)

    def _wait_address(self, log_path: Path, timeout: float = 120.0) -> str:
        info = self.state_dir / "coordinator.json"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            if info.exists():
                try:
                    data = json.loads(info.read_text())
                except json.JSONDecodeError:
                    data = {}
                if data.get("pid") == self.proc.pid:
                    return str(data["address"])
            time.sleep(0.1)
        raise RuntimeError(f"coordinator did not start within {timeout:.0f}s")

    @property
    def pid(self) -> int:
        """The coordinator's process id."""
        return self.proc.pid

    def create_job(self, spec: str) -> str:
        """Creates a job; returns its id."""
        return self.admin.CreateJob(pb.CreateJobRequest(spec_yaml=spec), metadata=self.admin_md, timeout=300).job_id

    def token(self, job_id: str, uses: int) -> str:
        """An enrollment token for ``uses`` clients."""
        return self.admin.CreateToken(pb.CreateTokenRequest(job_id=job_id, uses=uses, ttl_seconds=7200),
                                      metadata=self.admin_md, timeout=30).token

    def job(self, job_id: str) -> pb.JobStatus:
        """The job's status as ``fedtune job status`` reads it."""
        return self.admin.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.admin_md, timeout=60)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the coordinator has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> tuple[float, float]:
        """(current, peak) resident memory in MiB."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within 20 s."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------- one simulated client
@dataclass
class Stats:
    """What a phase's clients saw."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    held: int = 0

    def error(self, e: BaseException) -> None:
        """Counts a failed call by its status code."""
        key = e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
        self.errors[key] = self.errors.get(key, 0) + 1


class SimClient:
    """One agent's protocol, without training: join, signed heartbeats, upload."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.sign_key = Ed25519PrivateKey.generate()
        self.kx_key = X25519PrivateKey.generate()
        self.client_id = ""
        self.heartbeat_seconds = 1.0
        self.task: pb.Task | None = None

    def md(self, method: str) -> list[tuple[str, str]]:
        """Signed metadata for one call, as the agent makes it (fresh each call)."""
        return sign_request(self.sign_key, _SVC + method, self.client_id)

    async def join(self, token: str) -> None:
        """Enrolls with the token and the client's public keys."""
        reply = await self.stub.Join(pb.JoinRequest(
            token=token, client_name=self.name, agent_version="load", device="cpu",
            sign_public_key=raw_public_bytes(self.sign_key), kx_public_key=raw_public_bytes(self.kx_key),
            features=list(CLIENT_FEATURES)), timeout=120)
        self.client_id = reply.client_id
        self.heartbeat_seconds = float(reply.heartbeat_seconds or 1)

    async def heartbeat(self, long_poll: float, stats: Stats | None, held: Stats | None = None) -> float:
        """One heartbeat; returns how long to wait before the next one. With ``held``, a call the
        coordinator held (answered after at least half of ``long_poll``: a coordinator may end a
        hold early, at random, to spread the re-asks) is counted there, not in ``stats``."""
        request = pb.HeartbeatRequest(client_id=self.client_id, wait_seconds=long_poll,
                                      training_task_id=self.task.task_id if self.task is not None else "")
        t0 = time.perf_counter()
        try:
            reply = await self.stub.Heartbeat(request, metadata=self.md("Heartbeat"), timeout=30 + long_poll)
        except grpc.aio.AioRpcError as e:
            if stats is not None:
                stats.error(e)
            return self.heartbeat_seconds
        took = time.perf_counter() - t0
        was_held = bool(long_poll) and took >= 0.5 * long_poll
        if held is not None and was_held:
            held.latencies.append(took)
            held.held += 1
        elif stats is not None:
            stats.latencies.append(took)
            stats.held += was_held
        if reply.action in (pb.HeartbeatReply.TRAIN, pb.HeartbeatReply.EVALUATE) and self.task is None:
            self.task = reply.task
        interval = reply.retry_after_seconds or self.heartbeat_seconds
        # A held (long-poll) call already waited; a plain poll waits out the interval.
        return max(0.0, interval - took) if long_poll else interval

    async def poll_loop(self, stop: asyncio.Event, long_poll: float, recorder: list[Stats | None],
                        held: list[Stats | None] | None = None) -> None:
        """Heartbeats until ``stop``; latencies go to ``recorder[0]`` while it is set (held calls
        to ``held[0]``, when given)."""
        await asyncio.sleep(random.random() * self.heartbeat_seconds)  # spread the population over the interval
        while not stop.is_set():
            wait = await self.heartbeat(long_poll, recorder[0], held[0] if held is not None else None)
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except asyncio.TimeoutError:
                    pass

    async def close(self) -> None:
        """Closes the connection."""
        await self.channel.close()


async def join_all(clients: list[SimClient], token: str, concurrency: int = 32) -> float:
    """Joins every client, ``concurrency`` at a time; returns the seconds it took."""
    sem = asyncio.Semaphore(concurrency)

    async def one(c: SimClient) -> None:
        async with sem:
            await c.join(token)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    return time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def connected_count(coord: CoordinatorProcess, job_id: str) -> tuple[int, int]:
    """(connected, enrolled) clients of the job, read through the admin API."""
    status = coord.job(job_id)
    return sum(1 for c in status.clients if c.connected), len(status.clients)


# ---------------------------------------------------------------------- idle population
async def idle_steps(coord: CoordinatorProcess, steps: list[int], seconds: float, long_poll: float,
                     warmup: float = 3.0, probes: int = 20) -> list[dict[str, Any]]:
    """Grows the population to each size in ``steps`` and measures a window of heartbeats. With
    ``long_poll``, ``probes`` more clients plain-poll and their latencies are the ones reported."""
    probes = probes if long_poll else 0
    job_id = coord.create_job(IDLE_SPEC)
    token = coord.token(job_id, max(steps) + probes)
    stop = asyncio.Event()
    recorder: list[Stats | None] = [None]
    held_recorder: list[Stats | None] = [None]
    clients: list[SimClient] = []
    loops: list[asyncio.Task[None]] = []
    rows = []
    try:
        if probes:
            prober = [SimClient(coord.address, f"probe-{i}") for i in range(probes)]
            await join_all(prober, token)
            clients += prober
            loops += [asyncio.create_task(c.poll_loop(stop, 0.0, recorder)) for c in prober]
        for n in steps:
            fresh = [SimClient(coord.address, f"load-{i}") for i in range(len(clients) - probes, n)]
            join_seconds = await join_all(fresh, token)
            clients += fresh
            loops += [asyncio.create_task(c.poll_loop(stop, long_poll, recorder, held_recorder)) for c in fresh]
            await asyncio.sleep(warmup + 1.0)
            stats, held = Stats(), Stats()
            recorder[0], held_recorder[0] = stats, held
            cpu0, own0, t0 = coord.cpu_seconds(), time.process_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            recorder[0] = held_recorder[0] = None
            wall = time.perf_counter() - t0
            cpu, own = coord.cpu_seconds() - cpu0, time.process_time() - own0
            rss, peak = coord.rss_mib()
            connected, enrolled = await asyncio.to_thread(connected_count, coord, job_id)
            answers = len(stats.latencies) + len(held.latencies)
            row = {
                "clients": n, "connected": connected, "enrolled": enrolled, "join_seconds_new": round(join_seconds, 2),
                "probes": probes, "heartbeats": answers, "heartbeats_per_s": round(answers / wall, 1),
                "held_answers": len(held.latencies),
                "p50_ms": round(percentile(stats.latencies, 50) * 1e3, 2),
                "p99_ms": round(percentile(stats.latencies, 99) * 1e3, 2),
                "max_ms": round(max(stats.latencies, default=float("nan")) * 1e3, 2),
                "errors": sum(stats.errors.values()) + sum(held.errors.values()),
                "error_codes": {k: stats.errors.get(k, 0) + held.errors.get(k, 0) for k in {*stats.errors, *held.errors}},
                "held": stats.held + held.held,
                "coordinator_cpu_pct": round(100 * cpu / wall, 1), "coordinator_rss_mib": round(rss, 1),
                "coordinator_peak_rss_mib": round(peak, 1), "generator_cpu_pct": round(100 * own / wall, 1),
                "long_poll": long_poll, "window_s": round(wall, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop.set()
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return rows


# ---------------------------------------------------------------------- task delivery
async def task_delivery(coord: CoordinatorProcess, n: int, long_poll: float, settle: float = 5.0,
                        timeout: float = 120.0) -> dict[str, Any]:
    """``n`` clients wait (held long-polls, or plain polls) until one more joins and the round opens;
    how long after the round opened each of them got its TRAIN answer."""
    job_id = coord.create_job(deliver_spec(n + 1))
    token = coord.token(job_id, n + 1)
    clients = [SimClient(coord.address, f"wait-{i}") for i in range(n)]
    got: dict[str, float] = {}
    stats = Stats()
    stop = asyncio.Event()

    async def wait_for_task(c: SimClient) -> None:
        await asyncio.sleep(random.random() * (2.0 if long_poll else c.heartbeat_seconds))
        while not stop.is_set():
            request = pb.HeartbeatRequest(client_id=c.client_id, wait_seconds=long_poll)
            try:
                reply = await c.stub.Heartbeat(request, metadata=c.md("Heartbeat"), timeout=30 + long_poll)
            except grpc.aio.AioRpcError as e:
                stats.error(e)
                await asyncio.sleep(c.heartbeat_seconds)
                continue
            if reply.action == pb.HeartbeatReply.TRAIN:
                got[c.client_id] = time.time()
                return
            if reply.retry_after_seconds > 0:
                try:
                    await asyncio.wait_for(stop.wait(), reply.retry_after_seconds)
                except asyncio.TimeoutError:
                    pass

    loops: list[asyncio.Task[None]] = []
    last = SimClient(coord.address, "last")
    try:
        await join_all(clients, token)
        loops = [asyncio.create_task(wait_for_task(c)) for c in clients]
        await asyncio.sleep(settle)  # every long-poll held (or the polls paced) by now
        cpu0, t0 = coord.cpu_seconds(), time.perf_counter()
        await last.join(token)
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu = coord.cpu_seconds() - cpu0
        rss, _peak = coord.rss_mib()
        db = sqlite3.connect(f"file:{coord.state_dir / 'state.db'}?mode=ro", uri=True)
        try:
            (opened,) = db.execute("SELECT opened FROM rounds WHERE job_id=? AND round=1", (job_id,)).fetchone()
        finally:
            db.close()
        delays = [at - opened for at in got.values()]
        row = {
            "waiting": n, "long_poll": long_poll, "delivered": len(got), "errors": sum(stats.errors.values()),
            "error_codes": stats.errors, "first_ms": round(min(delays, default=float("nan")) * 1e3, 1),
            "p10_ms": round(percentile(delays, 10) * 1e3, 1), "p50_ms": round(percentile(delays, 50) * 1e3, 1),
            "p99_ms": round(percentile(delays, 99) * 1e3, 1), "max_ms": round(max(delays, default=float("nan")) * 1e3, 1),
            "coordinator_cpu_pct": round(100 * cpu / wall, 1), "coordinator_rss_mib": round(rss, 1),
        }
        print(json.dumps(row), flush=True)
        return row
    finally:
        stop.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in [*clients, last]), return_exceptions=True)


# ---------------------------------------------------------------------- upload burst
def _update_payload(global_adapter: bytes) -> bytes:
    """A plausible fp32 update with the adapter's names and shapes (small random values)."""
    import torch

    from fedtune.compression.codecs import get_codec
    from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes

    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in bytes_to_tensors(global_adapter).items()}
    codec = get_codec("fp32")
    return tensors_to_bytes(codec.encode(delta), metadata={"codec": codec.name})


async def _download(c: SimClient, sha256: str) -> bytes:
    call = c.stub.Download(pb.DownloadRequest(sha256=sha256), metadata=c.md("Download"), timeout=120)
    return b"".join([chunk.data async for chunk in call])


async def upload_burst(coord: CoordinatorProcess, n: int, task_timeout: float = 300.0) -> dict[str, Any]:
    """``n`` clients get their tasks, then all upload at the same instant."""
    job_id = coord.create_job(UPLOAD_SPEC.format(n=n))
    token = coord.token(job_id, n)
    clients = [SimClient(coord.address, f"up-{i}") for i in range(n)]
    stop = asyncio.Event()
    recorder: list[Stats | None] = [None]
    try:
        await join_all(clients, token)
        loops = [asyncio.create_task(c.poll_loop(stop, 0.0, recorder)) for c in clients]
        end = time.monotonic() + task_timeout
        while any(c.task is None for c in clients):
            if time.monotonic() > end:
                raise RuntimeError(f"only {sum(c.task is not None for c in clients)} of {n} clients got a task")
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*loops)
        first = clients[0].task
        assert first is not None
        plain = await asyncio.to_thread(_update_payload, await _download(clients[0], first.global_adapter.sha256))

        def sealed(c: SimClient) -> tuple[pb.UpdateHeader, bytes]:
            t = c.task
            assert t is not None
            update_id = hashlib.sha256(f"{c.client_id}:{t.task_id}".encode()).hexdigest()[:32]
            payload = seal(plain, t.job_public_key, UpdateBinding(t.job_id, t.round, c.client_id, update_id))
            return pb.UpdateHeader(
                job_id=t.job_id, round=t.round, task_id=t.task_id, update_id=update_id, num_examples=8,
                total_size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), codec="fp32",
                envelope=ENVELOPE_SCHEME, metrics={"train_loss": 1.0}), payload

        prepared = [sealed(c) for c in clients]
        start = asyncio.Event()
        stats = Stats()
        acked: list[str] = []
        done_at: list[float] = []

        async def send(c: SimClient, header: pb.UpdateHeader, payload: bytes) -> None:
            md = c.md("Upload")
            await start.wait()
            t0 = time.perf_counter()
            try:
                reply = await c.stub.Upload(upload_messages(header, payload), metadata=md, timeout=600)
            except grpc.aio.AioRpcError as e:
                stats.error(e)
                return
            stats.latencies.append(time.perf_counter() - t0)
            done_at.append(time.perf_counter())
            if not reply.duplicate:
                acked.append(header.update_id)

        senders = [asyncio.create_task(send(c, h, p)) for c, (h, p) in zip(clients, prepared, strict=True)]
        await asyncio.sleep(0.5)
        cpu0, t0 = coord.cpu_seconds(), time.perf_counter()
        start.set()
        await asyncio.gather(*senders)
        wall = max(done_at, default=time.perf_counter()) - t0
        cpu = coord.cpu_seconds() - cpu0
        rss, peak = coord.rss_mib()
        # Lost: acknowledged, yet not in the coordinator's database (or its blob missing).
        db = sqlite3.connect(f"file:{coord.state_dir / 'state.db'}?mode=ro", uri=True)
        try:
            stored = dict(db.execute("SELECT update_id, sha256 FROM updates WHERE job_id=?", (job_id,)).fetchall())
        finally:
            db.close()
        blobs = coord.state_dir / "blobs"
        lost = [u for u in acked if u not in stored or not (blobs / stored[u][:2] / stored[u]).is_file()]
        row = {
            "uploads": n, "update_bytes": len(prepared[0][1]), "accepted": len(acked), "errors": sum(stats.errors.values()),
            "error_codes": stats.errors, "lost": len(lost), "stored_rows": len(stored), "seconds": round(wall, 2),
            "mb_per_s": round(n * len(prepared[0][1]) / wall / 1e6, 1),
            "ack_p50_s": round(percentile(stats.latencies, 50), 2), "ack_p99_s": round(percentile(stats.latencies, 99), 2),
            "coordinator_cpu_pct": round(100 * cpu / wall, 1), "coordinator_peak_rss_mib": round(peak, 1),
            "coordinator_rss_mib": round(rss, 1),
        }
        print(json.dumps(row), flush=True)
        return row
    finally:
        stop.set()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------------- report
def markdown(idle: list[dict[str, Any]], burst: dict[str, Any] | None,
             delivery: dict[str, Any] | None = None) -> str:
    """The results as markdown tables."""
    lines = [("| connected clients | heartbeats/s | p50 ms | p99 ms | max ms | errors | coordinator CPU % | "
              "coordinator RSS MiB | generator CPU % | held answers |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in idle:
        probes = f" + {r['probes']} probes" if r.get("probes") else ""
        lines.append(f"| {r['connected']} / {r['clients']}{probes} | {r['heartbeats_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['max_ms']} | {r['errors']} | {r['coordinator_cpu_pct']} | "
                     f"{r['coordinator_rss_mib']} | {r['generator_cpu_pct']} | {r.get('held_answers', 0)} |")
    if delivery is not None:
        lines += ["", ("| clients waiting | long-poll s | got the task | errors | open -> TRAIN p50 ms | p99 ms | "
                       "max ms | coordinator CPU % | coordinator RSS MiB |"), "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  (f"| {delivery['waiting']} | {delivery['long_poll']} | {delivery['delivered']} | {delivery['errors']} | "
                   f"{delivery['p50_ms']} | {delivery['p99_ms']} | {delivery['max_ms']} | "
                   f"{delivery['coordinator_cpu_pct']} | {delivery['coordinator_rss_mib']} |")]
    if burst is not None:
        lines += ["", ("| simultaneous uploads | update bytes | accepted | errors | lost | seconds | MB/s | "
                       "ack p50 s | ack p99 s | coordinator CPU % | coordinator peak RSS MiB |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  (f"| {burst['uploads']} | {burst['update_bytes']:,} | {burst['accepted']} | {burst['errors']} | "
                   f"{burst['lost']} | {burst['seconds']} | {burst['mb_per_s']} | {burst['ack_p50_s']} | "
                   f"{burst['ack_p99_s']} | {burst['coordinator_cpu_pct']} | {burst['coordinator_peak_rss_mib']} |")]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace,
              work: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """Every phase asked for, each against its own coordinator process."""
    idle: list[dict[str, Any]] = []
    burst = delivery = None
    steps = [int(s) for s in args.clients.split(",") if s]
    if steps:
        coord = CoordinatorProcess(work / "idle", work / "idle.log")
        try:
            idle = await idle_steps(coord, steps, args.seconds, args.long_poll, probes=args.probes)
        finally:
            coord.stop()
    if args.deliver:
        coord = CoordinatorProcess(work / "deliver", work / "deliver.log")
        try:
            delivery = await task_delivery(coord, args.deliver, args.long_poll)
        finally:
            coord.stop()
    if args.uploads:
        coord = CoordinatorProcess(work / "uploads", work / "uploads.log")
        try:
            burst = await upload_burst(coord, args.uploads)
        finally:
            coord.stop()
    return idle, burst, delivery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="200,1000,2000", help="population sizes, comma-separated ('' skips)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per population size")
    parser.add_argument("--long-poll", type=float, default=0.0, help="wait_seconds sent with each heartbeat")
    parser.add_argument("--probes", type=int, default=20,
                        help="with --long-poll: clients that plain-poll among the held ones; their latencies are reported")
    parser.add_argument("--deliver", type=int, default=0,
                        help="clients waiting for a round that then opens: time to each one's TRAIN (0 skips)")
    parser.add_argument("--uploads", type=int, default=200, help="clients uploading at once (0 skips)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "load_clients")
    parser.add_argument("--keep", action="store_true", help="keep the coordinators' state dirs and logs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-load-"))
    try:
        idle, burst, delivery = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"state dirs and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(), "idle": idle,
              "uploads": burst, "delivery": delivery, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "load_clients.json").write_text(json.dumps(result, indent=2))
    table = markdown(idle, burst, delivery)
    (args.out / "load_clients.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
