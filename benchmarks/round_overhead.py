"""Per-round overhead of a federated LoRA round, against an in-process floor.

Builds a ~100 M parameter Llama from an in-code config, starts a real coordinator and real client
agents through the `fedtune` CLI (separate processes on loopback), runs a short job and reads back
where each round's wall time went. Local training is kept short on purpose (a few steps on short
sequences), so what is left of a round is the federation's own cost: polling, transfer, update
validation, aggregation, evaluation, checkpointing and publication.

The baseline does the same clients' training and FedAvg in this one process with no network, no
disk and no validation: the model is loaded once, each client's adapter is trained in turn from
the current global, and the deltas are averaged in memory.

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
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
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
    p.add_argument("--transport", choices=["mtls", "insecure"], default="mtls",
                   help="mtls: trial certificates from `fedtune certs init`, as the demo and a deployment run; "
                        "insecure: plaintext loopback gRPC")
    p.add_argument("--timeout", type=float, default=1800, help="give up on the federated run after this many s")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "round_overhead")
    p.add_argument("--keep-work", action="store_true",
                   help="keep OUT/work (model copies of every participant, ~0.4 GB each)")
    return p.parse_args(argv)


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

    def done(self) -> dict[str, float]:
        machine, own = machine_cpu_seconds() - self.machine, own_cpu_seconds() - self.own
        return {"wall_seconds": time.time() - self.wall, "machine_cpu_seconds": machine, "own_cpu_seconds": own,
                "other_cpu_seconds": max(0.0, machine - own)}


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


# ---------------------------------------------------------------------------------------- report
def summarize(fed: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per round: wall time, training, overhead and its parts along the critical path."""
    names = fed["client_names"]
    logs = {f"client-{i}": log for i, log in enumerate(fed["client_logs"])}
    rows = []
    for rnd in fed["rounds"]:
        n, opened, closed, m = rnd["round"], rnd["opened"], rnd["closed"], rnd["metrics"]
        ups = [u for u in fed["updates"] if u["round"] == n]
        downs = [t["bytes_down"] for t in fed["tasks"] if t["round"] == n]
        wall = closed - opened
        train_max = max(u["metrics"]["train_seconds"] for u in ups)
        last = max(ups, key=lambda u: u["received"])
        lm = last["metrics"]
        log = logs.get(names.get(last["client_id"], ""), {}).get(n, {})
        agg_start = opened + m["seconds"]  # the engine's "seconds" stops where aggregation starts
        critical = {
            "poll_wait": log["task_at"] - opened if "task_at" in log else None,
            "fetch": lm["fetch_seconds"],
            "train": lm["train_seconds"],
            "pack": lm["pack_seconds"],
            "upload": log.get("upload_seconds"),
            "close_detect": agg_start - last["received"],
            "aggregate": m["aggregate_seconds"],
            "eval": m.get("eval_seconds", 0.0),
            "publish": m["publish_seconds"],
        }
        known = sum(v for v in critical.values() if v is not None)
        critical["unaccounted"] = wall - known  # adapter load into the model, the closing transaction
        base = baseline["rounds"][n - 1]["seconds"]
        rows.append({
            "round": n,
            "wall_seconds": wall,
            "engine_seconds_metric": m["seconds"],
            "client_train_seconds_max": train_max,
            "overhead_seconds": wall - train_max,
            "client_fetch_seconds_max": max(u["metrics"]["fetch_seconds"] for u in ups),
            "client_pack_seconds_max": max(u["metrics"]["pack_seconds"] for u in ups),
            "aggregate_seconds": m["aggregate_seconds"],
            "eval_seconds": m.get("eval_seconds", 0.0),
            "publish_seconds": m["publish_seconds"],
            "bytes_up_per_client": sum(u["size"] for u in ups) / len(ups),
            "bytes_down_per_client": sum(downs) / len(downs),
            "contributors": len(ups),
            "critical_path": critical,
            "gap_before_seconds": None,
            "baseline_seconds": base,
            "wall_over_baseline": wall / base,
        })
    for prev, row in zip(fed["rounds"], rows[1:]):
        row["gap_before_seconds"] = fed["rounds"][row["round"] - 1]["opened"] - prev["closed"]
    return rows


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    """The markdown report: setup line, per-round table, critical-path table, setup and load notes."""
    rows, model, base, cfg = result["rounds"], result["model"], result["baseline"], result["config"]
    lines = [
        (f"Model: Llama, {model['params'] / 1e6:.1f} M params ({model['layers']} layers, hidden {model['hidden']}, "
        f"{model['heads']} heads, intermediate {model['intermediate']}, vocab {model['vocab_size']}), fp32 on CPU, "
        f"{human_bytes(model['dir_bytes'])} on disk. LoRA r={LORA_R} on {'+'.join(LORA_TARGETS)}: "
        f"{base['adapter_params']:,} params = {human_bytes(base['adapter_bytes_fp32'])} fp32 "
        f"({result['update_bytes']:,} bytes per update on the wire)."),
        (f"{cfg['clients']} client processes x {cfg['client_threads']} thread over {cfg['transport']} gRPC on "
         f"loopback, {cfg['steps']} steps x batch "
        f"{cfg['batch_size']} x max_seq_len {cfg['max_seq_len']} per round; coordinator eval on "
        f"{cfg['eval_examples']} examples. Baseline: one process, {base['threads']} threads, clients trained in turn."),
        "",
        ("| round | wall s | max client train s | overhead s | client fetch s (max) | aggregate s | eval s "
        "| publish s | up / client | down / client | in-process baseline s | wall / baseline |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {_f(r['wall_seconds'])} | {_f(r['client_train_seconds_max'])} "
            f"| {_f(r['overhead_seconds'])} | {_f(r['client_fetch_seconds_max'])} | {_f(r['aggregate_seconds'], 3)} "
            f"| {_f(r['eval_seconds'])} | {_f(r['publish_seconds'], 3)} | {human_bytes(r['bytes_up_per_client'])} "
            f"| {human_bytes(r['bytes_down_per_client'])} | {_f(r['baseline_seconds'])} "
            f"| {_f(r['wall_over_baseline'], 1)}x |")
    lines += [
        "",
        "Critical path (the client whose update arrived last), seconds:",
        "",
        ("| round | wait for task (poll) | fetch (+load) | train | pack | upload | close detect | aggregate | eval "
        "| publish | unaccounted | gap before round |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["critical_path"]
        lines.append(
            f"| {r['round']} | {_f(c['poll_wait'])} | {_f(c['fetch'])} | {_f(c['train'])} | {_f(c['pack'], 3)} "
            f"| {_f(c['upload'], 3)} | {_f(c['close_detect'])} | {_f(c['aggregate'], 3)} | {_f(c['eval'])} "
            f"| {_f(c['publish'], 3)} | {_f(c['unaccounted'])} | {_f(r['gap_before_seconds'])} |")
    s = result["setup"]
    lines += [
        "",
        (f"One-time setup, not in any round: job create {s['job_create_seconds']:.1f}s; clients spawned -> round 1 "
        f"opened {s['spawn_to_round1_seconds']:.1f}s; baseline model load + tokenize {base['load_seconds']:.1f}s."),
    ]
    mem = result["memory"]
    lines.append(f"Memory: coordinator + clients peaked at {human_bytes(mem['peak_rss_sum_bytes'])} resident "
                 f"together (sampled each second); largest single process {human_bytes(mem['largest_child_peak_rss_bytes'])}"
                 f"; this process (baseline) {human_bytes(mem['benchmark_peak_rss_bytes'])}.")
    cores = result["machine"]["usable_cpus"]
    for phase, c in result["cpu"].items():
        lines.append(f"CPU during the {phase} phase: {c['own_cpu_seconds']:.0f}s ours, "
                     f"{c['other_cpu_seconds']:.0f}s by other processes, over {c['wall_seconds']:.0f}s wall "
                     f"on {cores} cores.")
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
    """Builds the model and data, runs the baseline, then the federation, and reports."""
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
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
        "setup": {"job_create_seconds": fed["create_seconds"],
                  "spawn_to_round1_seconds": fed["rounds"][0]["opened"] - fed["clients_spawned"]},
        "rounds": rows,
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
