"""Per-round overhead of a federated LoRA round, against an in-process floor.

Builds a ~100 M parameter Llama from an in-code config, starts a real coordinator and real client
agents through the `fedtune` CLI (separate processes on loopback), runs a short job and reads back
where each round's wall time went. Local training is kept short on purpose (a few steps on short
sequences), so what is left of a round is the federation's own cost: polling, transfer, update
validation, aggregation, evaluation, checkpointing and publication.

The baseline does the same clients' training and FedAvg in this one process with no network, no
disk and no validation: the model is loaded once, each client's adapter is trained in turn from
the current global, and the deltas are averaged in memory.

With ``--flower`` (the default) the same run also puts the same workload on Flower's deployment
engine: a ``flower-superlink`` and one ``flower-supernode`` per client, separate processes on loopback
with insecure transport, and ``flwr run`` submitting a Flower App (``round_overhead_flower.py``: a
ServerApp running FedAvg with the same server-side evaluation, a ClientApp training with the same
fedtune functions on the same model, LoRA, data, steps, batch and sequence length). Flower pins
protobuf below 7, so it runs from its own virtualenv (``benchmarks/.flower-venv``, ``--setup-flower``
creates it). When Flower runs, fedtune runs over plaintext gRPC too unless ``--transport mtls``.

Both engines are measured the same way: a round's wall time runs from the server opening it
(fedtune: the round row's ``opened``; Flower: ``configure_train``) to its aggregate existing (fedtune:
``aggregated_seconds``; Flower: the end of ``aggregate_train``), and its overhead is that minus the
slowest client's training as the client timed it (``train_adapter``'s own seconds on both sides). The
round period (one opening to the next) is reported beside it, because it is what a job waits per
round: it adds whatever runs between two rounds (Flower's evaluation; fedtune evaluates beside the
next round).

    python benchmarks/round_overhead.py --clients 4 --rounds 3 --steps 4 --out benchmarks/out/round_overhead

Prints markdown tables and writes ``OUT/round_overhead.json`` and ``OUT/round_overhead.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from simulation_vs_flower import FLOWER_VENV, setup_flower_venv
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fedtune.client.channel import INSECURE, ClientTls
from fedtune.data import load_jsonl, tokenize, write_synthetic_federation
from fedtune.demo import wait_for_coordinator
from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
from fedtune.report import human_bytes
from fedtune.strategies import WeightedDelta, get_strategy
from fedtune.training import train_adapter

LORA_R = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.0
LORA_TARGETS = ["q_proj", "v_proj"]
SEED = 0
# Share of the machine's CPU taken by other processes above which a phase's timings are flagged. On an
# idle machine a few percent still shows up here: kernel threads (page reclaim, DAMON) work for us too.
OTHER_LOAD_WARN = 0.15
# Marks a work dir as this script's, so a rerun may delete it without touching anything else.
WORK_MARKER = ".round_overhead-work"

SPEC = """\
name: round-overhead
base_model: {base}
peft: {{method: lora, r: {r}, alpha: {alpha}, dropout: {dropout}, target_modules: {targets}}}
training: {{steps: {steps}, lr: 0.001, batch_size: {batch_size}, max_seq_len: {max_seq_len}, seed: {seed}}}
rounds: {rounds}
clients_per_round: {clients}
min_clients: {clients}
round_deadline_seconds: 900
# Wait for the whole cohort: every round must have all clients, or rounds are not comparable.
cohort_wait_seconds: 600
eval_data: {eval_data}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in a few minutes on 2 CPU cores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="client agent processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="local optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--examples-per-client", type=int, default=32)
    p.add_argument("--eval-examples", type=int, default=16,
                   help="held-out examples the coordinator evaluates each round (0: no eval_data)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=10000,
                   help="model vocab (padded past the character tokenizer's ~100 ids to reach ~100 M params)")
    p.add_argument("--baseline-threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of the in-process baseline (default: usable cores)")
    p.add_argument("--client-threads", type=int, default=1, help="OMP_NUM_THREADS of each client process")
    p.add_argument("--coordinator-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the coordinator (default: torch's own choice, one per core)")
    p.add_argument("--transport", choices=["mtls", "insecure"], default=None,
                   help="fedtune's transport. mtls: trial certificates from `fedtune certs init`, as the demo and "
                        "a deployment run; insecure: plaintext loopback gRPC. Default: insecure when Flower runs "
                        "too (Flower runs insecure), mtls otherwise")
    p.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the workload on Flower's deployment engine (SuperLink + SuperNodes)")
    p.add_argument("--setup-flower", action="store_true", help=f"create {FLOWER_VENV} when missing")
    p.add_argument("--flower-venv", type=Path, default=FLOWER_VENV)
    p.add_argument("--timeout", type=float, default=1800, help="give up on the federated run after this many s")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "round_overhead")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/work (model copies of every participant, ~0.4 GB each)")
    args = p.parse_args(argv)
    if args.transport is None:
        args.transport = "insecure" if args.flower else "mtls"
    return args


# ---------------------------------------------------------------------------------------- cpu accounting
def machine_cpu_seconds() -> float:
    """CPU seconds every process on this machine has used (user, system, irq, steal) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes now (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


class CpuWatch:
    """CPU used by processes that are not ours during a phase: other load skews the timings."""

    def __init__(self) -> None:
        self.wall, self.machine, self.own = time.time(), machine_cpu_seconds(), own_cpu_seconds()
        self.load = load_average()

    def done(self, extra_own: float = 0.0) -> dict[str, Any]:
        """``extra_own``: CPU of our processes that rusage cannot see (detached grandchildren)."""
        machine, own = machine_cpu_seconds() - self.machine, own_cpu_seconds() - self.own + extra_own
        return {"wall_seconds": time.time() - self.wall, "machine_cpu_seconds": machine, "own_cpu_seconds": own,
                "other_cpu_seconds": max(0.0, machine - own), "load_before": self.load,
                "load_after": load_average()}


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------- setup
def fresh_work_dir(out: Path) -> Path:
    """An empty OUT/work; only a work dir this script made is ever deleted."""
    work = out / "work"
    if work.exists():
        if not (work / WORK_MARKER).exists():
            raise SystemExit(f"{work} exists and was not made by this script; pass another --out")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).touch()
    return work


def build_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """A randomly initialised Llama of ~100 M params with the tiny preset's character tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        materialize_preset(TINY_PRESET, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is below the tokenizer's {len(tokenizer)} ids")
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.max_seq_len), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    del model
    files = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    return {"params": params, "vocab_size": args.vocab, "tokenizer_ids": len(tokenizer), "hidden": args.hidden,
            "layers": args.layers, "heads": args.heads, "intermediate": args.intermediate,
            "dir_bytes": files}


# ---------------------------------------------------------------------------------------- baseline
def run_baseline(args: argparse.Namespace, model_dir: Path, client_files: list[Path]) -> dict[str, Any]:
    """The same clients' training and FedAvg in this process: no network, no disk, no validation."""
    torch.set_num_threads(args.baseline_threads)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = build_peft_model(load_causal_lm(model_dir, device), r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT,
                             target_modules=LORA_TARGETS, seed=SEED)
    data = [tokenize(load_jsonl(f), tokenizer, args.max_seq_len) for f in client_files]
    load_seconds = time.perf_counter() - t0
    global_state = adapter_state(model)
    adapter_params = sum(v.numel() for v in global_state.values())
    adapter_bytes = sum(v.numel() * v.element_size() for v in global_state.values())
    strategy = get_strategy("fedavg")
    rounds = []
    for rnd in range(1, args.rounds + 1):
        start = time.perf_counter()
        deltas, train = [], []
        for tokenized in data:
            load_adapter_state(model, global_state)
            result = train_adapter(model, tokenized, pad_id=tokenizer.pad_token_id, lr=1e-3,
                                   batch_size=args.batch_size, steps=args.steps, epochs=None, seed=SEED + rnd,
                                   device=device, progress=False)
            trained = adapter_state(model)
            deltas.append(WeightedDelta({k: trained[k] - global_state[k] for k in global_state},
                                        result.num_examples))
            train.append(result.seconds)
        avg = strategy.combine(deltas)
        global_state = {k: global_state[k] + avg[k] for k in global_state}
        seconds = time.perf_counter() - start
        rounds.append({"round": rnd, "seconds": seconds, "train_seconds_sum": sum(train),
                       "train_seconds_max": max(train), "other_seconds": seconds - sum(train)})
        print(f"baseline round {rnd}: {seconds:.2f}s ({sum(train):.2f}s training)", flush=True)
    del model
    return {"threads": args.baseline_threads, "load_seconds": load_seconds, "rounds": rounds,
            "adapter_params": adapter_params, "adapter_bytes_fp32": adapter_bytes}


# ---------------------------------------------------------------------------------------- federation
def _env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class Transport:
    """CLI flags for each participant: mTLS with trial certificates, or plaintext loopback."""

    def __init__(self, kind: str, cert_dir: Path, client_names: list[str]) -> None:
        self.kind, self.dir = kind, cert_dir
        if kind == "mtls":
            _cli("certs", "init", "--out", str(cert_dir), "--client", "operator",
                 *[a for name in client_names for a in ("--client", name)])

    def coordinator(self) -> list[str]:
        if self.kind == "insecure":
            return ["--insecure"]
        return ["--tls-cert", str(self.dir / "server.pem"), "--tls-key", str(self.dir / "server.key"),
                "--client-ca", str(self.dir / "ca.pem")]

    def client(self, name: str) -> list[str]:
        if self.kind == "insecure":
            return ["--insecure"]
        return ["--ca-cert", str(self.dir / "ca.pem"), "--client-cert", str(self.dir / f"{name}.pem"),
                "--client-key", str(self.dir / f"{name}.key")]

    def operator_env(self) -> dict[str, str]:
        """The admin commands read their certificates from the environment (plaintext is detected)."""
        if self.kind == "insecure":
            return {}
        return {"FEDTUNE_CA_CERT": str(self.dir / "ca.pem"), "FEDTUNE_CLIENT_CERT": str(self.dir / "operator.pem"),
                "FEDTUNE_CLIENT_KEY": str(self.dir / "operator.key")}

    def operator_tls(self) -> ClientTls:
        if self.kind == "insecure":
            return INSECURE
        return ClientTls(self.dir / "ca.pem", self.dir / "operator.pem", self.dir / "operator.key")


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "fedtune", *args], check=False, capture_output=True, text=True,
                          cwd=REPO, env=_env(None, env), timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"fedtune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def _spawn(args: list[str], log: Path, threads: int | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=REPO, env=_env(threads), start_new_session=True)


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM to every process still running, then SIGKILL to whatever outlives ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_federation(args: argparse.Namespace, work: Path, model_dir: Path, client_files: list[Path],
                   eval_file: Path | None) -> dict[str, Any]:
    """Coordinator + client processes through the CLI; returns the job's rounds as stored."""
    logs = work / "logs"
    logs.mkdir()
    coord_dir = work / "coordinator"
    names = [f"client-{i}" for i in range(len(client_files))]
    transport = Transport(args.transport, work / "certs", names)
    admin_env = transport.operator_env()
    procs: list[subprocess.Popen[bytes]] = []
    coord = _spawn(["coordinator", "start", "--state-dir", str(coord_dir), "--port", "0", "--in-process",
                    *transport.coordinator()],
                   logs / "coordinator.log", args.coordinator_threads)
    procs.append(coord)
    try:
        address = wait_for_coordinator(coord_dir, coord, transport.operator_tls())
        spec = work / "spec.yaml"
        spec.write_text(SPEC.format(
            base=json.dumps(str(model_dir)), r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT,
            targets=json.dumps(LORA_TARGETS), steps=args.steps, batch_size=args.batch_size,
            max_seq_len=args.max_seq_len, seed=SEED, rounds=args.rounds, clients=args.clients,
            eval_data=json.dumps(str(eval_file)) if eval_file else "null"))
        t0 = time.time()
        job = _cli("job", "create", str(spec), "--state-dir", str(coord_dir), env=admin_env)
        create_seconds = time.time() - t0
        print(f"job {job} created in {create_seconds:.1f}s on {address}", flush=True)
        spawned = time.time()
        clients = []
        for name, data in zip(names, client_files):
            token = _cli("token", "create", "--job", job, "--state-dir", str(coord_dir), env=admin_env)
            clients.append(_spawn(["client", "run", "--coordinator", address, "--token", token, "--data", str(data),
                                   "--state-dir", str(work / "clients" / name), "--name", name, "--no-progress",
                                   "--device", "cpu", *transport.client(name)], logs / f"{name}.log",
                                  args.client_threads))
        procs.extend(clients)
        # Clients exit 0 when the coordinator tells them the job is over.
        deadline = time.time() + args.timeout
        peak_rss = 0
        while any(c.poll() is None for c in clients):
            peak_rss = max(peak_rss, rss_bytes([p.pid for p in procs]))
            for i, c in enumerate(clients):
                if c.poll() not in (None, 0):
                    raise SystemExit(f"client-{i} exited {c.returncode}:\n{_tail(logs / f'client-{i}.log')}")
            if coord.poll() is not None:
                raise SystemExit(f"coordinator exited {coord.returncode}:\n{_tail(logs / 'coordinator.log')}")
            if time.time() > deadline:
                raise SystemExit(f"federated run did not finish in {args.timeout:.0f}s; logs in {logs}")
            time.sleep(1.0)
        status = json.loads(_cli("job", "status", job, "--state-dir", str(coord_dir), "--format", "json",
                                 env=admin_env))
        if status["state"] != "finished":
            raise SystemExit(f"job {job} ended {status['state']}: {status['message']}")
        stored = read_state(coord_dir / "state.db", job)
        stored.update(job=job, status=status, create_seconds=create_seconds, clients_spawned=spawned,
                      memory={"peak_rss_sum_bytes": peak_rss},
                      client_logs=[parse_client_log(logs / f"client-{i}.log") for i in range(len(clients))])
        return stored
    finally:
        stop_processes(procs)


def read_state(db_path: Path, job: str) -> dict[str, Any]:
    """Rounds, updates, tasks and client names of a job, read from the coordinator's SQLite (read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rounds = [dict(r) for r in db.execute("SELECT round, opened, closed, metrics_json FROM rounds "
                                              "WHERE job_id=? ORDER BY round", (job,))]
        updates = [dict(r) for r in db.execute("SELECT round, client_id, received, size, num_examples, metrics_json "
                                               "FROM updates WHERE job_id=? ORDER BY round, received", (job,))]
        tasks = [dict(r) for r in db.execute("SELECT round, client_id, bytes_down FROM tasks WHERE job_id=?", (job,))]
        names = dict(db.execute("SELECT client_id, name FROM clients WHERE job_id=?", (job,)).fetchall())
    finally:
        db.close()
    for r in (*rounds, *updates):
        r["metrics"] = json.loads(r.pop("metrics_json") or "{}")
    return {"rounds": rounds, "updates": updates, "tasks": tasks, "client_names": names}


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_TASK = re.compile(r"round (\d+): task ")
_UPLOAD = re.compile(r"round (\d+): update \S+ (?:accepted|already stored) \((\d+) bytes in ([\d.]+)s")


def parse_client_log(path: Path) -> dict[int, dict[str, float]]:
    """When each task reached the client (log time) and how long its upload took, by round."""
    out: dict[int, dict[str, float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stamp = _LOG_TIME.match(line)
        if not stamp:
            continue
        when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
        if m := _TASK.search(line):
            out.setdefault(int(m.group(1)), {})["task_at"] = when
        elif m := _UPLOAD.search(line):
            out.setdefault(int(m.group(1)), {})["upload_seconds"] = float(m.group(3))
    return out


# ---------------------------------------------------------------------------------------- Flower
FLOWER_APP_MODULE = "round_overhead_flower"
FLOWER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "roundoverhead"
version = "1.0.0"
description = "fedtune's round_overhead benchmark on Flower's deployment engine"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
{config}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _descendants(roots: list[int]) -> list[int]:
    """These processes and all their descendants now (SuperExec and the per-message app processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def flower_python(args: argparse.Namespace) -> Path:
    """The Flower virtualenv's python, made first with --setup-flower."""
    if args.setup_flower:
        return setup_flower_venv(args.flower_venv)
    python = args.flower_venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no Flower virtualenv at {args.flower_venv}: rerun with --setup-flower (or --no-flower)")
    return python


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout:.0f}s; see {log}")


def run_flower(args: argparse.Namespace, python: Path, work: Path, model_dir: Path, client_files: list[Path],
               eval_file: Path | None) -> dict[str, Any]:
    """SuperLink + one SuperNode per client on loopback (insecure), the Flower App submitted by `flwr run`."""
    root = work / "flower"
    app, home, logs = root / "app", root / "home", work / "logs"
    for d in (app, home):
        d.mkdir(parents=True)
    logs.mkdir(exist_ok=True)
    result_file = root / "result.json"
    config = {
        "model-dir": str(model_dir), "data-files": ",".join(str(f) for f in client_files),
        "eval-file": str(eval_file) if eval_file else "", "result-file": str(result_file),
        "clients": args.clients, "rounds": args.rounds, "steps": args.steps, "batch-size": args.batch_size,
        "max-seq-len": args.max_seq_len, "lr": 0.001, "seed": SEED, "client-threads": args.client_threads,
        "lora-r": LORA_R, "lora-alpha": LORA_ALPHA, "lora-dropout": LORA_DROPOUT,
        "lora-targets": ",".join(LORA_TARGETS), "round-timeout": float(args.timeout),
    }
    (app / "pyproject.toml").write_text(FLOWER_PYPROJECT.format(
        module=FLOWER_APP_MODULE, config="\n".join(f"{k} = {_toml(v)}" for k, v in config.items())))
    shutil.copy(REPO / "benchmarks" / f"{FLOWER_APP_MODULE}.py", app / f"{FLOWER_APP_MODULE}.py")
    port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    bindir = python.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(bindir), env.get("PATH", "")]), FLWR_HOME=str(home),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    if args.coordinator_threads is not None:
        env.update(OMP_NUM_THREADS=str(args.coordinator_threads), MKL_NUM_THREADS=str(args.coordinator_threads))
    client_env = {**env, "OMP_NUM_THREADS": str(args.client_threads), "MKL_NUM_THREADS": str(args.client_threads)}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], log: Path, penv: dict[str, str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=root, env=penv,
                             start_new_session=True)
        procs.append(p)
        return p

    tree: list[int] = []
    try:
        link = spawn([str(bindir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                      "--host", "127.0.0.1", "--port", str(port)], logs / "flower-superlink.log", env)
        _wait_http(f"http://127.0.0.1:{port}/health", link, logs / "flower-superlink.log")
        for i in range(len(client_files)):
            spawn([str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions={len(client_files)}"],
                  logs / f"flower-supernode-{i}.log", client_env)
        t0 = time.time()
        run = subprocess.run([str(bindir / "flwr"), "run", str(app), "bench", "--format", "json"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        submitted = time.time()
        (logs / "flwr-run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise SystemExit(f"flwr run exited {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}")
        print(f"Flower run submitted in {submitted - t0:.1f}s on 127.0.0.1:{port}", flush=True)
        deadline, peak_rss, peak_procs = time.time() + args.timeout, 0, 0
        cpu_seen: dict[int, float] = {}  # per process of the tree, its CPU when last sampled
        while not result_file.exists():
            tree = _descendants([p.pid for p in procs])
            peak_rss, peak_procs = max(peak_rss, rss_bytes(tree)), max(peak_procs, len(tree))
            for pid in tree:
                cpu_seen[pid] = max(cpu_seen.get(pid, 0.0), process_cpu_seconds(pid))
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"{Path(p.args[0]).name} exited {p.returncode}:\n"
                                     f"{_tail(Path(p.stdout.name) if p.stdout else logs / 'flower-superlink.log')}")
            if time.time() > deadline:
                raise SystemExit(f"Flower run did not finish in {args.timeout:.0f}s; logs in {logs}")
            time.sleep(1.0)
        result = json.loads(result_file.read_text())
        for pid in _descendants([p.pid for p in procs]):
            cpu_seen[pid] = max(cpu_seen.get(pid, 0.0), process_cpu_seconds(pid))
        result.update(submit_started=t0, submitted=submitted, memory={"peak_rss_sum_bytes": peak_rss},
                      # Our direct children show in rusage once waited for; the rest of the tree does not.
                      detached_cpu_seconds=sum(v for pid, v in cpu_seen.items()
                                               if pid not in {p.pid for p in procs}),
                      peak_processes=peak_procs, flwr_version=_flower_version(python))
        return result
    finally:
        leftovers = _descendants([p.pid for p in procs])
        stop_processes(procs)
        for pid in leftovers:  # SuperExec and app processes detach into their own sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _flower_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                          text=True, check=False).stdout.strip()


# ---------------------------------------------------------------------------------------- report
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(fed: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """fedtune, one record per round: wall (opened -> aggregated), training, overhead and its parts.

    The engine is event-driven: round r+1 opens once r's aggregate is durable, and r's evaluation and
    publication run beside r+1, so they are reported but are not on a round's critical path (except the
    last round's, which the job waits for)."""
    names = fed["client_names"]
    logs = {f"client-{i}": log for i, log in enumerate(fed["client_logs"])}
    stored = fed["rounds"]
    rows = []
    for i, rnd in enumerate(stored):
        n, opened, closed, m = rnd["round"], rnd["opened"], rnd["closed"], rnd["metrics"]
        ups = [u for u in fed["updates"] if u["round"] == n]
        downs = [t["bytes_down"] for t in fed["tasks"] if t["round"] == n]
        wall = m.get("aggregated_seconds", closed - opened)
        train_max = max(u["metrics"]["train_seconds"] for u in ups)
        last = max(ups, key=lambda u: u["received"])
        lm = last["metrics"]
        log = logs.get(names.get(last["client_id"], ""), {}).get(n, {})
        agg_start = opened + wall - m["aggregate_seconds"]
        critical = {
            "poll_wait": log["task_at"] - opened if "task_at" in log else None,
            "fetch": lm["fetch_seconds"],
            "train": lm["train_seconds"],
            "pack": lm["pack_seconds"],
            "upload": log.get("upload_seconds"),
            "close_detect": agg_start - last["received"],
            "aggregate": m["aggregate_seconds"],
        }
        known = sum(v for v in critical.values() if v is not None)
        critical["unaccounted"] = wall - known  # adapter load into the model, the aggregating transaction
        # One opening to the next; the last round to its publication (its evaluation included).
        period = (stored[i + 1]["opened"] - opened) if i + 1 < len(stored) else closed - opened
        base = baseline["rounds"][n - 1]["seconds"]
        rows.append({
            "round": n,
            "wall_seconds": wall,
            "period_seconds": period,
            "published_seconds_metric": m.get("seconds"),
            "client_train_seconds_max": train_max,
            "overhead_seconds": wall - train_max,
            "period_overhead_seconds": period - train_max,
            "client_fetch_seconds_max": max(u["metrics"]["fetch_seconds"] for u in ups),
            "client_pack_seconds_max": max(u["metrics"]["pack_seconds"] for u in ups),
            "aggregate_seconds": m["aggregate_seconds"],
            "eval_seconds": m.get("eval_seconds", 0.0),
            "publish_seconds": m["publish_seconds"],
            "bytes_up_per_client": sum(u["size"] for u in ups) / len(ups),
            "bytes_down_per_client": sum(downs) / len(downs),
            "contributors": len(ups),
            "critical_path": critical,
            "gap_before_seconds": opened - stored[i - 1]["opened"] - stored[i - 1]["metrics"].get(
                "aggregated_seconds", 0.0) if i else None,
            "baseline_seconds": base,
            "wall_over_baseline": wall / base,
        })
    return rows


def summarize_flower(fl: dict[str, Any]) -> list[dict[str, Any]]:
    """Flower, one record per round, measured as fedtune's: configure_train -> aggregate_train done."""
    marks = [fl["rounds"][str(r)] for r in sorted(int(k) for k in fl["rounds"])]
    evals = fl["evals"]
    rows = []
    for i, m in enumerate(marks):
        n = i + 1
        clients = m["clients"]
        opened = m["opened"]
        wall = m["aggregated"] - opened
        train_max = max(c["train_seconds"] for c in clients)
        last = max(clients, key=lambda c: c["replied_at"])
        ev = evals.get(str(n), {})
        end = ev.get("end", m["aggregated"])
        period = (marks[i + 1]["opened"] - opened) if i + 1 < len(marks) else end - opened
        critical = {
            "dispatch": last["process_started_at"] - opened,  # SuperNode pulls the message, spawns flwr-clientapp
            "launch": last["imported_at"] - last["process_started_at"],  # interpreter, flwr, task + FAB pull, install
            "imports": last["handler_at"] - last["imported_at"],  # the app module: torch, transformers, fedtune
            "model_load": last["loaded_at"] - last["handler_at"],  # base from disk + LoRA wrap
            "prepare": last["trained_at"] - last["loaded_at"] - last["train_seconds"],  # adapter in, tokenize
            "train": last["train_seconds"],
            "pack": last["replied_at"] - last["trained_at"],
            "return": m["replies_in"] - last["replied_at"],  # reply to SuperLink, ServerApp pulls it
            "aggregate": m["aggregated"] - m["replies_in"],
        }
        rows.append({
            "round": n,
            "wall_seconds": wall,
            "period_seconds": period,
            "client_train_seconds_max": train_max,
            "overhead_seconds": wall - train_max,
            "period_overhead_seconds": period - train_max,
            "eval_seconds": ev.get("end", 0.0) - ev.get("start", 0.0),
            "critical_path": critical,
            "gap_before_seconds": opened - marks[i - 1]["aggregated"] if i else None,
            "contributors": len(clients),
            "errors": m.get("errors", []),
        })
    return rows


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over all rounds and over rounds 2.. (round 1 includes fedtune's one-time base download)."""
    later = [r for r in rows if r["round"] > 1] or rows
    return {key: _mean([r[key] for r in rows]) for key in
            ("wall_seconds", "client_train_seconds_max", "overhead_seconds", "period_seconds",
             "period_overhead_seconds")} | {
        "steady_overhead_seconds": _mean([r["overhead_seconds"] for r in later]),
        "steady_period_overhead_seconds": _mean([r["period_overhead_seconds"] for r in later]),
        "rounds": len(rows), "steady_rounds": [r["round"] for r in later]}


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _load(phase: dict[str, Any] | None) -> str:
    if not phase:
        return "-"
    return f"{phase['load_before'][0]:.1f} → {phase['load_after'][0]:.1f}"


def render(result: dict[str, Any]) -> str:
    """The markdown report: setup, headline comparison, per-round tables, critical paths, setup and load."""
    rows, model, base, cfg = result["rounds"], result["model"], result["baseline"], result["config"]
    flower = result.get("flower")
    cpu = result["cpu"]
    lines = [
        (f"Model: Llama, {model['params'] / 1e6:.1f} M params ({model['layers']} layers, hidden {model['hidden']}, "
         f"{model['heads']} heads, intermediate {model['intermediate']}, vocab {model['vocab_size']}), fp32 on CPU, "
         f"{human_bytes(model['dir_bytes'])} on disk. LoRA r={LORA_R} on {'+'.join(LORA_TARGETS)}: "
         f"{base['adapter_params']:,} params = {human_bytes(base['adapter_bytes_fp32'])} fp32 "
         f"({result['update_bytes']:,} bytes per fedtune update on the wire)."),
        (f"{cfg['clients']} clients x {cfg['client_threads']} thread, {cfg['steps']} steps x batch "
         f"{cfg['batch_size']} x max_seq_len {cfg['max_seq_len']} per round, {cfg['rounds']} rounds; server-side "
         f"eval on {cfg['eval_examples']} examples. fedtune: coordinator + client agents over {cfg['transport']} "
         f"gRPC on loopback. Baseline: one process, {base['threads']} threads, clients trained in turn."),
    ]
    if flower:
        lines.append(
            f"Flower {flower['flwr_version']}: flower-superlink + {cfg['clients']} flower-supernode processes, "
            "insecure, on loopback (Flower's Fleet API is protobuf over HTTP); `flwr run` submits a Flower App; "
            "FedAvg in the ServerApp (flwr-serverapp), the ClientApp in a new flwr-clientapp process per message.")
    heads = {"fedtune": headline(rows)} | ({"Flower": headline(flower["rounds"])} if flower else {})
    lines += [
        "",
        ("| engine | rounds | wall s (open → aggregated) | max client train s | **overhead s** (wall − train) "
         "| overhead s, rounds 2.. | period s (open → next open) | period − train s | period − train s, rounds 2.. "
         "| load avg (1 min) start → end |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, h in heads.items():
        phase = cpu.get("federated" if name == "fedtune" else "flower")
        lines.append(
            f"| {name} | {h['rounds']} | {_f(h['wall_seconds'])} | {_f(h['client_train_seconds_max'])} "
            f"| **{_f(h['overhead_seconds'])}** | {_f(h['steady_overhead_seconds'])} | {_f(h['period_seconds'])} "
            f"| {_f(h['period_overhead_seconds'])} | {_f(h['steady_period_overhead_seconds'])} | {_load(phase)} |")
    goal = heads["fedtune"]["steady_overhead_seconds"]
    lines += ["", (f"Goal (issue 13): fedtune overhead under 0.25 s per round. Rounds 2..: {_f(goal, 3)} s: "
                   f"**{'met' if goal is not None and goal < 0.25 else 'not met'}**. Means; every round below.")]
    lines += [
        "",
        "fedtune per round:",
        "",
        ("| round | wall s | max client train s | overhead s | period s | client fetch s (max) | aggregate s "
         "| eval s (beside next) | publish s (beside next) | up / client | down / client | in-process baseline s "
         "| wall / baseline |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {_f(r['wall_seconds'])} | {_f(r['client_train_seconds_max'])} "
            f"| {_f(r['overhead_seconds'])} | {_f(r['period_seconds'])} | {_f(r['client_fetch_seconds_max'])} "
            f"| {_f(r['aggregate_seconds'], 3)} | {_f(r['eval_seconds'])} | {_f(r['publish_seconds'], 3)} "
            f"| {human_bytes(r['bytes_up_per_client'])} | {human_bytes(r['bytes_down_per_client'])} "
            f"| {_f(r['baseline_seconds'])} | {_f(r['wall_over_baseline'], 1)}x |")
    lines += [
        "",
        "fedtune critical path (the client whose update arrived last), seconds:",
        "",
        ("| round | wait for task (poll) | fetch (+load) | train | pack | upload | close detect | aggregate "
         "| unaccounted | gap after previous aggregate |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["critical_path"]
        lines.append(
            f"| {r['round']} | {_f(c['poll_wait'])} | {_f(c['fetch'])} | {_f(c['train'])} | {_f(c['pack'], 3)} "
            f"| {_f(c['upload'], 3)} | {_f(c['close_detect'], 3)} | {_f(c['aggregate'], 3)} "
            f"| {_f(c['unaccounted'], 3)} | {_f(r['gap_before_seconds'], 3)} |")
    if flower:
        lines += [
            "",
            "Flower per round and critical path (the client whose reply was sent last), seconds:",
            "",
            ("| round | wall s | max client train s | overhead s | period s | dispatch (pull + spawn) "
             "| launch (flwr, task + FAB) | imports (torch, fedtune) | model load (+LoRA) | prepare | train | pack "
             "| return | aggregate "
             "| eval (serial) | gap after previous aggregate |"),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in flower["rounds"]:
            c = r["critical_path"]
            lines.append(
                f"| {r['round']} | {_f(r['wall_seconds'])} | {_f(r['client_train_seconds_max'])} "
                f"| {_f(r['overhead_seconds'])} | {_f(r['period_seconds'])} | {_f(c['dispatch'])} "
                f"| {_f(c['launch'])} | {_f(c['imports'])} | {_f(c['model_load'])} | {_f(c['prepare'])} "
                f"| {_f(c['train'])} | {_f(c['pack'], 3)} | {_f(c['return'])} | {_f(c['aggregate'], 3)} "
                f"| {_f(r['eval_seconds'])} | {_f(r['gap_before_seconds'])} |")
    s = result["setup"]
    lines += [
        "",
        (f"One-time setup, not in any round: fedtune job create {s['job_create_seconds']:.1f}s, clients spawned -> "
         f"round 1 opened {s['spawn_to_round1_seconds']:.1f}s; baseline model load + tokenize "
         f"{base['load_seconds']:.1f}s."
         + (f" Flower: `flwr run` {s['flower_submit_seconds']:.1f}s, submitted -> round 1 opened "
            f"{s['flower_submit_to_round1_seconds']:.1f}s (ServerApp start, base load, initial eval)."
            if flower else "")),
    ]
    mem = result["memory"]
    lines.append(f"Memory: fedtune coordinator + clients peaked at {human_bytes(mem['peak_rss_sum_bytes'])} resident "
                 f"together (sampled each second); this process (baseline) "
                 f"{human_bytes(mem['benchmark_peak_rss_bytes'])}."
                 + (f" Flower's process tree peaked at {human_bytes(flower['memory']['peak_rss_sum_bytes'])} "
                    f"({flower['peak_processes']} processes)." if flower else ""))
    cores = result["machine"]["usable_cpus"]
    for phase, c in cpu.items():
        lines.append(f"CPU during the {phase} phase: {c['own_cpu_seconds']:.0f}s ours, "
                     f"{c['other_cpu_seconds']:.0f}s by other processes, over {c['wall_seconds']:.0f}s wall "
                     f"on {cores} cores; load average {c['load_before']} → {c['load_after']}.")
        share = c["other_cpu_seconds"] / max(c["wall_seconds"] * cores, 1e-9)
        if share > OTHER_LOAD_WARN:
            lines.append(f"**Warning: other processes took {share:.0%} of the machine during the {phase} phase; "
                         "its timings are skewed. Rerun on an idle machine.**")
    return "\n".join(lines)


def source() -> dict[str, Any]:
    """The fedtune commit measured, and whether fedtune/ had local changes."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fedtune"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"repo": str(REPO), "commit": None}
    return {"repo": str(REPO), "commit": commit, "fedtune_dirty": bool(dirty)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "mem_bytes": mem, "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> None:
    """Builds the model and data, runs the baseline, the fedtune federation, Flower's, and reports."""
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    python = flower_python(args) if args.flower else None
    out = args.out.resolve()
    work = fresh_work_dir(out)
    started = time.time()
    model_dir = work / "model"
    model = build_model(args, model_dir)
    print(f"model: {model['params'] / 1e6:.1f} M params in {model_dir}", flush=True)
    client_files, eval_file = write_synthetic_federation(work / "data", args.clients, args.examples_per_client,
                                                         max(args.eval_examples, 1))
    watch = CpuWatch()
    baseline = run_baseline(args, model_dir, client_files)
    cpu = {"baseline": watch.done()}
    watch = CpuWatch()
    fed = run_federation(args, work, model_dir, client_files, eval_file if args.eval_examples > 0 else None)
    cpu["federated"] = watch.done()
    rows = summarize(fed, baseline)
    flower = None
    if python is not None:
        print(f"Flower deployment engine (load {load_average()})", flush=True)
        watch = CpuWatch()
        flower = run_flower(args, python, work, model_dir, client_files,
                            eval_file if args.eval_examples > 0 else None)
        cpu["flower"] = watch.done(flower["detached_cpu_seconds"])
        flower["rounds_raw"], flower["rounds"] = flower["rounds"], summarize_flower(flower)
    setup = {"job_create_seconds": fed["create_seconds"],
             "spawn_to_round1_seconds": fed["rounds"][0]["opened"] - fed["clients_spawned"]}
    if flower is not None:
        setup.update(flower_submit_seconds=flower["submitted"] - flower["submit_started"],
                     flower_submit_to_round1_seconds=flower["rounds_raw"]["1"]["opened"] - flower["submitted"])
    result = {
        "benchmark": "round_overhead",
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "source": source(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": LORA_TARGETS},
        "model": model,
        "update_bytes": fed["updates"][0]["size"],
        "setup": setup,
        "rounds": rows,
        "headline": {"fedtune": headline(rows)} | ({"flower": headline(flower["rounds"])} if flower else {}),
        "flower": flower,
        "baseline": baseline,
        "history": fed["status"]["history"],
        "cpu": cpu,
        "memory": {**fed["memory"], "largest_child_peak_rss_bytes":
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                   "benchmark_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "total_seconds": time.time() - started,
    }
    table = render(result)
    print("\n" + table)
    (out / "round_overhead.json").write_text(json.dumps(result, indent=2))
    (out / "round_overhead.md").write_text(table + "\n")
    shutil.copytree(work / "logs", out / "logs", dirs_exist_ok=True)
    if not args.keep_work:
        shutil.rmtree(work)
    print(f"\nwrote {out / 'round_overhead.json'} (logs in {out / 'logs'}; {result['total_seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
