"""Simulated round time: `fedtune simulate` against Flower's simulation engine (issue 5 c).

The same tiny model (the `tiny-llama` preset), the same rank-8 LoRA, the same partitions of the same
data, the same local training code (`fedtune.training.train_adapter`) and the same rounds, with every
client training in every round, for N = 10, 100 and 1000 virtual clients:

- fedtune: `python -m fedtune simulate`: a real coordinator on loopback gRPC, each virtual client
  the real client agent (fetch by sha256, train, pack, AEAD envelope, chunked upload) run on a pool
  of long-lived Ray actors that keep their imports and loaded model across clients and rounds (as
  many as the machine's CPUs fit at ``--client-cpus`` each), the coordinator validating and storing
  every update durably (SQLite + blob store), aggregating, evaluating and publishing a signed
  adapter each round.
- Flower: `flwr.simulation.run_simulation` with a `ServerApp` running the message-API `FedAvg` over
  all N nodes per round and a `ClientApp` whose train function calls the same fedtune functions
  (`fedtune.models`, `fedtune.data`, `fedtune.training`, `fedtune.peft_io`); messages stay in memory.
  Server-side evaluation (`evaluate_fn`) runs the same `evaluate_loss` on the same eval set, as
  fedtune's coordinator does after every round.

Flower pins protobuf below 7 and fedtune needs 7, so Flower runs in its own virtualenv
(``benchmarks/.flower-venv``, git-ignored). This script creates it when missing (``--setup-flower``)
and runs its own Flower half there (the hidden ``_flower`` subcommand).

    .venv/bin/python benchmarks/simulation_vs_flower.py --setup-flower --out benchmarks/out/simulation_vs_flower

Prints a markdown table and writes ``OUT/simulation_vs_flower.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLOWER_VENV = REPO / "benchmarks" / ".flower-venv"
# torch first and exactly this version: it is the CPU build on this machine's disk; any other
# version pulls a multi-GB CUDA build. Then Flower with its own Ray and protobuf, and what
# fedtune's training modules import (fedtune itself goes in with --no-deps).
FLOWER_PACKAGES = [["torch==2.13.0"],
                   ["flwr[simulation]", "transformers", "peft", "safetensors", "tokenizers", "tqdm", "numpy",
                    "pyyaml", "pydantic", "psutil"],
                   ["--no-deps", "-e", str(REPO)]]
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
SEED = 0
EVAL_EXAMPLES = 64

SPEC = """\
name: sim-vs-flower
base_model: tiny-llama
peft: {{method: lora, r: {r}, alpha: {alpha}, dropout: {dropout}, target_modules: [{targets}]}}
training: {{steps: {steps}, lr: {lr}, batch_size: {batch_size}, max_seq_len: {max_seq_len}, seed: {seed}}}
rounds: {rounds}
clients_per_round: {clients}
min_clients: {clients}
round_deadline_seconds: 3600
cohort_wait_seconds: 0
eval_data: {eval_data}
"""


# ---------------------------------------------------------------------------------------- setup
def setup_flower_venv(venv: Path) -> Path:
    """Creates the Flower virtualenv when it lacks flwr; returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import flwr, fedtune.training"],
                                          check=False, capture_output=True).returncode == 0:
        return python
    print(f"setting up the Flower virtualenv in {venv} (a few minutes)", flush=True)
    subprocess.run([sys.executable if not shutil.which("python3.11") else "python3.11", "-m", "venv", str(venv)],
                   check=True)
    for packages in FLOWER_PACKAGES:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def write_shared_data(root: Path, n: int, examples_per_client: int) -> dict[str, Any]:
    """One pool, one eval set and N iid partitions, written once and fed to both sides."""
    sys.path.insert(0, str(REPO))
    from fedtune.data import write_synthetic_federation
    from fedtune.models import TINY_PRESET, materialize_preset
    from fedtune.simulation.partition import partition, write_partitions

    pool_files, eval_file = write_synthetic_federation(root / "pool", 5, examples_per_client=math.ceil(
        examples_per_client * n / 5), eval_examples=EVAL_EXAMPLES, seed=SEED)
    pool = root / "pool" / "all.jsonl"
    pool.write_text("".join(p.read_text() for p in pool_files))
    parts = write_partitions(partition(pool, n, "iid", seed=SEED), root / "clients-data")
    base = root / "base"
    if not (base / "config.json").exists():
        materialize_preset(TINY_PRESET, base)
    return {"pool": pool, "eval": eval_file, "partitions": parts, "base": base}


def digest(paths: list[Path]) -> str:
    """sha256 over the files' contents in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- measuring
class TreeMemory:
    """Samples the proportional set size (PSS) summed over a process and all its descendants.

    PSS splits shared pages (torch's libraries, Ray's shared-memory object store) among the
    processes mapping them, so the sum does not count them once per Ray worker. Ray's workers are
    children of its raylet, itself a child of the driver, so the tree covers the whole run.
    """

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                continue
        if total > self.peak:
            self.peak, self.peak_processes = total, len(procs)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> None:
        """Stops sampling."""
        self._stop.set()
        self._thread.join()


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Runs a command with its output to `log`, sampling its process tree's memory."""
    load_before = load_average()
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mem = TreeMemory(proc.pid)
        rc = proc.wait()
        mem.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); last lines of {log}:\n{tail}")
    return {"wall_seconds": wall, "peak_pss_bytes": mem.peak, "peak_processes": mem.peak_processes,
            "load_before": load_before, "load_after": load_average()}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false", "FEDTUNE_LOG_LEVEL": "WARNING", **(extra or {})}
    env.pop("PYTHONPATH", None)
    return env


# ---------------------------------------------------------------------------------------- fedtune
def run_fedtune(args: argparse.Namespace, data: dict[str, Any], n: int, rounds: int, work: Path,
                batch_clients: int = 1) -> dict[str, Any]:
    """`fedtune simulate` on the shared data; round times read back from the coordinator's state.

    With ``batch_clients`` above 1, that many virtual clients share a Ray task (and ``--client-cpus``)
    and train their adapters in one pass of the base.
    """
    spec = work / "job.yaml"
    spec.write_text(SPEC.format(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                targets=", ".join(LORA["target_modules"]), steps=args.steps, lr=args.lr,
                                batch_size=args.batch_size, max_seq_len=args.max_seq_len, seed=SEED,
                                rounds=rounds, clients=n, eval_data=data["eval"]))
    out = work / ("fedtune" if batch_clients == 1 else f"fedtune-batched{batch_clients}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "fedtune", "simulate", "--config", str(spec),
           "--clients", str(n), "--partition", "iid", "--data", str(data["pool"]), "--out", str(out),
           "--client-resources", f"cpus={args.client_cpus}", "--batch-clients", str(batch_clients)]
    run = run_measured(cmd, work / f"{out.name}.log", _env())
    # The runner partitions --data itself with the same function and seed: check it fed the same shares.
    fed_parts = [out / "clients-data" / p.name for p in data["partitions"]]
    same = digest(fed_parts) == digest(data["partitions"])
    ran = json.loads((out / "simulation.json").read_text()) if (out / "simulation.json").exists() else {}
    pool = {"workers": ran.get("workers"), "worker_processes": len({r["pid"] for r in ran.get("runs", [])}) or None,
            "client_runs": sum(len(r["clients"]) for r in ran.get("runs", [])) or None}
    db = sqlite3.connect(out / "coordinator" / "state.db")
    rows = db.execute("SELECT round, opened, closed, metrics_json FROM rounds ORDER BY round").fetchall()
    updates = db.execute("SELECT round, COUNT(*), AVG(size) FROM updates GROUP BY round").fetchall()
    db.close()
    per_round, previous = [], None
    for rnd, opened, closed, metrics_json in rows:
        m = json.loads(metrics_json or "{}")
        # Round 1 from its opening; later ones publish to publish (what a user waits per round).
        start = opened if previous is None else previous
        per_round.append({"round": rnd, "seconds": closed - start, "open_to_publish": m.get("seconds"),
                          "contributors": m.get("contributors"), "train_loss": m.get("train_loss"),
                          "eval_loss": m.get("eval_loss"), "bytes_up": m.get("bytes_up"),
                          "bytes_down": m.get("bytes_down"), "eval_seconds": m.get("eval_seconds"),
                          "client_train_seconds_max": m.get("client_train_seconds_max")})
        previous = closed
    if not args.keep_work:
        shutil.rmtree(out, ignore_errors=True)
    return {**run, **pool, "rounds": per_round, "partitions_identical": same,
            "update_bytes_mean": updates[-1][2] if updates else None,
            "bytes_up_per_client": per_round[-1]["bytes_up"] / n if per_round else None,
            "bytes_down_per_client_round1": per_round[0]["bytes_down"] / n if per_round else None,
            "bytes_down_per_client_later": per_round[-1]["bytes_down"] / n if len(per_round) > 1 else None}


# ---------------------------------------------------------------------------------------- Flower
def run_flower(args: argparse.Namespace, python: Path, data: dict[str, Any], n: int, rounds: int,
               work: Path) -> dict[str, Any]:
    """This script's `_flower` half in the Flower virtualenv."""
    result = work / "flower.json"
    cmd = [str(python), str(Path(__file__).resolve()), "_flower", "--clients", str(n), "--rounds", str(rounds),
           "--data-dir", str(data["partitions"][0].parent), "--base", str(data["base"]), "--eval", str(data["eval"]),
           "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--max-seq-len", str(args.max_seq_len), "--client-cpus", str(args.client_cpus), "--result", str(result)]
    run = run_measured(cmd, work / "flower.log", _env())
    return {**run, **json.loads(result.read_text())}


def flower_main(argv: list[str]) -> None:
    """Runs one Flower simulation (inside the Flower virtualenv) and writes its timings as JSON."""
    p = argparse.ArgumentParser(prog="simulation_vs_flower.py _flower")
    for name, kind in (("--clients", int), ("--rounds", int), ("--data-dir", str), ("--base", str),
                       ("--eval", str), ("--steps", int), ("--lr", float), ("--batch-size", int),
                       ("--max-seq-len", int), ("--client-cpus", float), ("--result", str)):
        p.add_argument(name, type=kind, required=True)
    a = p.parse_args(argv)

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedtune.data import load_jsonl, tokenize
    from fedtune.models import load_causal_lm, load_tokenizer
    from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
    from fedtune.training import evaluate_loss, train_adapter

    cpu = torch.device("cpu")
    settings = {"data_dir": a.data_dir, "base": a.base, "steps": a.steps, "lr": a.lr, "batch_size": a.batch_size,
                "max_seq_len": a.max_seq_len, "seed": SEED}

    def build(base: str) -> tuple[Any, Any]:
        tokenizer = load_tokenizer(Path(base))
        model = build_peft_model(load_causal_lm(Path(base), cpu), r=LORA["r"], alpha=LORA["alpha"],
                                 dropout=LORA["dropout"], target_modules=LORA["target_modules"], seed=SEED)
        return tokenizer, model

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        # Per message, as a fedtune virtual client does per task: read the private share, load the
        # base, wrap it with LoRA, take the global adapter, train, hand the adapter back.
        cfg = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        examples = load_jsonl(Path(str(cfg["data_dir"])) / f"client-{pid}.jsonl")
        tokenizer, model = build(str(cfg["base"]))
        load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
        result = train_adapter(model, tokenize(examples, tokenizer, int(cfg["max_seq_len"])),
                               pad_id=tokenizer.pad_token_id, lr=float(cfg["lr"]),
                               batch_size=int(cfg["batch_size"]), steps=int(cfg["steps"]), epochs=None,
                               seed=int(cfg["seed"]) + int(cfg["server-round"]), device=cpu, progress=False)
        metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.mean_loss,
                                "train_seconds": result.seconds})
        return Message(RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": metrics}), reply_to=msg)

    marks: list[float] = []
    evals: list[float] = []
    train_losses: dict[int, float] = {}
    payload: dict[str, int] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        tokenizer, model = build(a.base)
        eval_set = tokenize(load_jsonl(Path(a.eval)), tokenizer, a.max_seq_len)
        initial = adapter_state(model)
        payload["adapter_bytes"] = sum(t.numel() * t.element_size() for t in initial.values())

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            load_adapter_state(model, arrays.to_torch_state_dict())
            loss = evaluate_loss(model, eval_set, pad_id=tokenizer.pad_token_id, batch_size=a.batch_size, device=cpu)
            evals.append(loss)
            marks.append(time.time())
            return MetricRecord({"eval_loss": loss})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=a.clients,
                          min_available_nodes=a.clients)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=a.rounds,
                                train_config=ConfigRecord(settings), evaluate_fn=evaluate)
        for rnd, m in result.train_metrics_clientapp.items():
            train_losses[int(rnd)] = float(m["train_loss"])

    scratch = tempfile.mkdtemp(prefix="flray-", dir="/tmp")
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=a.clients,
                       backend_config={"init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                                     "_temp_dir": scratch, "log_to_driver": False},
                                       "client_resources": {"num_cpus": a.client_cpus, "num_gpus": 0.0}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if len(marks) != a.rounds + 1:
        raise SystemExit(f"Flower ran {len(marks) - 1} of {a.rounds} rounds")
    # marks[0]: the initial evaluation, before round 1; each later mark ends a round (its evaluation).
    rounds = [{"round": r, "seconds": marks[r] - marks[r - 1], "train_loss": train_losses.get(r),
               "eval_loss": evals[r]} for r in range(1, a.rounds + 1)]
    Path(a.result).write_text(json.dumps({"rounds": rounds, "initial_eval_loss": evals[0],
                                          "adapter_bytes": payload["adapter_bytes"],
                                          "flwr_version": _version("flwr"), "ray_version": _version("ray")}))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------------------- report
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def summarize(side: dict[str, Any]) -> dict[str, Any]:
    """First round, mean of the later rounds, peak memory and total wall of one side's run."""
    secs = [r["seconds"] for r in side["rounds"]]
    return {"rounds": len(secs), "first": secs[0] if secs else None, "later": _mean(secs[1:]),
            "peak_gib": side["peak_pss_bytes"] / 2**30, "wall": side["wall_seconds"],
            "final_eval_loss": side["rounds"][-1]["eval_loss"] if secs else None}


def render(result: dict[str, Any]) -> str:
    """The markdown table of a run."""
    lines = [("| N | rounds | fedtune s/round (rounds 2+) | fedtune round 1 | Flower s/round (rounds 2+) | "
              "Flower round 1 | fedtune / Flower (2+) | peak memory fedtune / Flower (GiB, PSS) | "
              "total wall fedtune / Flower (s) | bytes / client / round up, down (fedtune; Flower in memory) | "
              "final eval loss fedtune / Flower |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batched = [row for row in result["runs"] if "fedtune-batched" in row]
    for row in result["runs"]:
        f, w = summarize(row["fedtune"]), summarize(row["flower"])
        ratio = f["later"] / w["later"] if f["later"] and w["later"] else None
        fb = row["fedtune"]
        lines.append(
            f"| {row['clients']} | {f['rounds']} | {_f(f['later'])} | {_f(f['first'])} | {_f(w['later'])} | "
            f"{_f(w['first'])} | {_f(ratio, 2)}x | {f['peak_gib']:.2f} / {w['peak_gib']:.2f} | "
            f"{f['wall']:.0f} / {w['wall']:.0f} | {_f(fb['bytes_up_per_client'], 0)}, "
            f"{_f(fb['bytes_down_per_client_later'], 0)} ({_f(fb['bytes_down_per_client_round1'], 0)} in round 1); "
            f"{row['flower']['adapter_bytes']:,}, {row['flower']['adapter_bytes']:,} | "
            f"{_f(f['final_eval_loss'], 4)} / {_f(w['final_eval_loss'], 4)} |")
    if batched:
        k = result["settings"].get("batch_clients")
        lines += ["", (f"| N | fedtune batched ({k} per task) s/round (2+) | round 1 | vs fedtune (2+) | vs Flower (2+) | "
                       "peak memory batched / fedtune / Flower (GiB, PSS) | final eval loss batched / fedtune |"),
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in batched:
            b, f, w = summarize(row["fedtune-batched"]), summarize(row["fedtune"]), summarize(row["flower"])
            vs_f = b["later"] / f["later"] if b["later"] and f["later"] else None
            vs_w = b["later"] / w["later"] if b["later"] and w["later"] else None
            lines.append(f"| {row['clients']} | {_f(b['later'])} | {_f(b['first'])} | {_f(vs_f, 2)}x | {_f(vs_w, 2)}x | "
                         f"{b['peak_gib']:.2f} / {f['peak_gib']:.2f} / {w['peak_gib']:.2f} | "
                         f"{_f(b['final_eval_loss'], 4)} / {_f(f['final_eval_loss'], 4)} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=REPO)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(),
            "date": datetime.now().isoformat(timespec="seconds"), "commit": commit.stdout.strip()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults take about 20 minutes on 2 CPU cores."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="N values to run")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run")
    p.add_argument("--rounds-at", default="1000=2",
                   help="fewer rounds for large N, e.g. 1000=2 (comma-separated N=ROUNDS)")
    p.add_argument("--steps", type=int, default=1, help="local optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--examples-per-client", type=int, default=16)
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="CPUs each fedtune pool worker / Flower actor reserves (fedtune simulate's own default: 0.25)")
    p.add_argument("--sides", nargs="+", choices=["fedtune", "fedtune-batched", "flower"],
                   default=["fedtune", "flower"])
    p.add_argument("--batch-clients", type=int, default=8,
                   help="virtual clients per Ray task on the fedtune-batched side")
    p.add_argument("--setup-flower", action="store_true", help=f"create {FLOWER_VENV} when missing")
    p.add_argument("--flower-venv", type=Path, default=FLOWER_VENV)
    p.add_argument("--keep-work", action="store_true", help="keep fedtune's state dirs under OUT/work")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "simulation_vs_flower")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs both sides for each N and prints the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_flower":
        flower_main(argv[1:])
        return
    args = parse_args(argv)
    python = args.flower_venv / "bin" / "python"
    if "flower" in args.sides:
        if args.setup_flower:
            python = setup_flower_venv(args.flower_venv)
        elif not python.exists():
            raise SystemExit(f"no Flower virtualenv at {args.flower_venv}: rerun with --setup-flower, or make it by "
                             "hand: python3.11 -m venv benchmarks/.flower-venv && benchmarks/.flower-venv/bin/pip "
                             "install torch==2.13.0 && benchmarks/.flower-venv/bin/pip install 'flwr[simulation]' "
                             "transformers peft psutil && benchmarks/.flower-venv/bin/pip install --no-deps -e .")
    rounds_at = {int(k): int(v) for k, v in (x.split("=") for x in filter(None, args.rounds_at.split(",")))}
    args.out = args.out.resolve()  # the fedtune side runs with another working directory
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
                              "runs": []}
    started = time.perf_counter()
    for n in args.clients:
        rounds = rounds_at.get(n, args.rounds)
        work = args.out / "work" / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        data = write_shared_data(work, n, args.examples_per_client)
        row: dict[str, Any] = {"clients": n, "rounds": rounds}
        for side in args.sides:
            print(f"N={n}: {side}, {rounds} rounds (load {load_average()})", flush=True)
            if side == "fedtune":
                row["fedtune"] = run_fedtune(args, data, n, rounds, work)
            elif side == "fedtune-batched":
                row[side] = run_fedtune(args, data, n, rounds, work, args.batch_clients)
            else:
                row["flower"] = run_flower(args, python, data, n, rounds, work)
            s = summarize(row[side])
            workers = (f", {row[side]['worker_processes']} worker processes for {row[side]['client_runs']} client runs"
                       if row[side].get("worker_processes") else "")
            print(f"  {side}: round 1 {_f(s['first'])} s, later {_f(s['later'])} s/round, peak {s['peak_gib']:.2f} GiB,"
                  f" wall {s['wall']:.0f} s{workers}", flush=True)
        result["runs"].append(row)
        if not args.keep_work:
            shutil.rmtree(work / "clients-data", ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    if {"fedtune", "flower"} <= set(args.sides):
        table = render(result)
        print(table)
        (args.out / "simulation_vs_flower.md").write_text(table + "\n")
    (args.out / "simulation_vs_flower.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out / 'simulation_vs_flower.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
