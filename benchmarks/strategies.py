"""Aggregation strategies on a non-IID federation of 16 virtual clients, beside Flower's (issue: strategies).

A small Llama-shaped decoder is pretrained here (``peft_methods.pretrain_base``: synthetic text made
of the tasks' pieces, never the tasks), so that eval losses mean something; the task is
``fedtune.data``'s five synthetic ones (reverse, upper, sort, copy, add), a pool split over 16 clients
by ``dirichlet:ALPHA`` over the task (the prompt's first word), with the held-out eval set's prompts
removed from the pool. Rank-8 LoRA on q_proj/v_proj, every client in every round.

1. Strategy table. For ALPHA in 0.1 and 1.0 and every registered strategy, ``python -m fedtune
   simulate`` (real loopback coordinator, each virtual client a Ray task running the real agent,
   durable state, evaluation of every published round): the final eval loss, the rounds and seconds
   to a target loss (90% of the way from the base's loss to fedtune FedAvg's final loss at that
   ALPHA) and the wall time. Side by side, in its own virtualenv (``benchmarks/.flower-venv``, as
   ``simulation_vs_flower.py``; Flower pins protobuf < 7), Flower's own implementation of the same
   strategy (``flwr.serverapp.strategy``: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx,
   FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan; Flower has no SCAFFOLD) on the same partitions
   (checked by sha256), the same initial adapter, the same local training
   (``fedtune.training.train_adapter`` with the job's recipe and per-round seed; FedProx's proximal
   gradient from ``fedtune.strategies.local``) and the same server-side evaluation. Agreement of the
   final losses (within the seed noise measured in part 2's harness) is the correctness check;
   fedtune's wall time is the figure.
2. Byzantine table. ``fedtune simulate`` has no attacker, so this part runs its own federation in
   this process through the coordinator's aggregation (``fedtune.coordinator.compute.next_global``
   with a ``StrategyRun`` carrying each strategy's durable state, as ``peft_methods.py`` does) and
   the agent's client plan and training loop: 0, 1, 2 and 4 of the 16 clients train honestly and
   then send their delta sign-flipped and scaled (``--attack-scale``), with their true example
   counts. fedavg, fedmedian, fedtrimmedavg, krum, multikrum and bulyan, each configured for the
   most attackers it can tolerate here. The harness's 0-attacker FedAvg is checked against
   ``fedtune simulate``'s FedAvg on the same data, and two more seeds give the seed noise.
3. Async vs sync (``--parts async``). One client at a quarter of the speed of the others: in its Ray
   worker a ``sitecustomize`` (written by this script to OUT/work, on PYTHONPATH of the simulate
   process only) wraps ``ClientAgent._train`` of virtual client ``v0`` to sleep 3x the time its task
   took so far, before it uploads, so its updates arrive 4x later without using more CPU (a device
   at a quarter of the speed, not more work on this machine's 2 cores). Sync FedAvg rounds wait for
   it; ``aggregation.mode: async`` (FedBuff: a new version every ``buffer`` updates, staleness
   weight (1+s)^-0.5) does not. Both run the same number of client updates; the figure is the wall
   time to the part-1 target. When this fedtune does not accept the async spec, or its simulate
   publishes no version in time, the part is skipped with the reason.

    .venv/bin/python benchmarks/strategies.py --quick --out benchmarks/out/strategies-quick   # ~5 min
    .venv/bin/python benchmarks/strategies.py --setup-flower --out benchmarks/out/strategies

Prints markdown tables and writes ``OUT/strategies.json`` and ``OUT/strategies.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulation_vs_flower import (
    FLOWER_VENV,
    REPO,
    _env,
    _f,
    _mean,
    _version,
    digest,
    load_average,
    machine,
    run_measured,
    setup_flower_venv,
)

N_CLIENTS = 16
SEED = 0
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
ATTACKERS = (0, 1, 2, 4)
TARGET_FRACTION = 0.9

# fedtune strategy and options, Flower's class and keyword arguments for the same thing (None: Flower
# has none). Options: see the module docstrings in fedtune/strategies/ and RESULTS.md for the choices.
STRATEGIES: list[tuple[str, dict[str, Any], str | None, dict[str, Any]]] = [
    ("fedavg", {}, "FedAvg", {}),
    ("fedavgm", {"server_lr": 1.0, "momentum": 0.5}, "FedAvgM", {"server_learning_rate": 1.0, "server_momentum": 0.5}),
    ("fedadam", {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}, "FedAdam",
     {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}, "FedYogi",
     {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    # Flower's FedAdagrad fixes beta_1 = 0 (no first moment), so fedtune's runs with beta1 0 here.
    ("fedadagrad", {"server_lr": 0.01, "beta1": 0.0, "tau": 1e-3}, "FedAdagrad", {"eta": 0.01, "tau": 1e-3}),
    ("fedprox", {"mu": 0.1}, "FedProx", {"proximal_mu": 0.1}),
    ("scaffold", {"server_lr": 1.0}, None, {}),
    ("fedmedian", {}, "FedMedian", {}),
    ("fedtrimmedavg", {"beta": 0.2}, "FedTrimmedAvg", {"beta": 0.2}),
    ("krum", {"byzantine": 2}, "Krum", {"num_malicious_nodes": 2}),
    ("multikrum", {"byzantine": 2}, "MultiKrum", {"num_malicious_nodes": 2, "num_nodes_to_select": N_CLIENTS - 2}),
    ("bulyan", {"byzantine": 3}, "Bulyan", {"num_malicious_nodes": 3}),
]
QUICK_STRATEGIES = ("fedavg", "fedadam", "krum")
# Part 2: each robust strategy set for the most of 4 attackers it tolerates with 16 clients
# (Bulyan needs n >= 4f + 3: f <= 3).
BYZANTINE: list[tuple[str, dict[str, Any]]] = [
    ("fedavg", {}), ("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.25}), ("krum", {"byzantine": 4}),
    ("multikrum", {"byzantine": 4}), ("bulyan", {"byzantine": 3}),
]

SPEC = """\
name: strategies-{name}
base_model: {base}
peft: {{method: lora, r: {r}, alpha: {alpha}, dropout: {dropout}, target_modules: [{targets}]}}
training: {{steps: {steps}, lr: {lr}, batch_size: {batch_size}, max_seq_len: {max_seq_len}, seed: {seed}}}
rounds: {rounds}
clients_per_round: {clients}
min_clients: {clients}
round_deadline_seconds: 3600
cohort_wait_seconds: 0
eval_data: {eval_data}
aggregation: {aggregation}
"""

# Written to OUT/work/slow-client/sitecustomize.py for part 3 (see the module docstring).
SLOW_CLIENT_HOOK = '''\
"""strategies.py part 3: makes one virtual client of `fedtune simulate` a quarter of the others' speed."""
import importlib.abc
import importlib.util
import os
import sys
import time

SLOW = os.environ.get("STRATEGIES_SLOW_CLIENT")
FACTOR = float(os.environ.get("STRATEGIES_SLOW_FACTOR", "4"))
LOG = os.environ.get("STRATEGIES_SLOW_LOG")


def _patch(cls):
    run_task, train = cls._run_task, cls._train

    def timed_run_task(self, *args, **kwargs):
        self._strategies_t0 = time.perf_counter()
        return run_task(self, *args, **kwargs)

    def slow_train(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        if self.name == SLOW:
            pause = (FACTOR - 1) * (time.perf_counter() - getattr(self, "_strategies_t0", time.perf_counter()))
            time.sleep(pause)
            if LOG:
                with open(LOG, "a") as f:
                    f.write(f"{self.name} {time.time():.3f} {pause:.3f}\\n")
        return out

    cls._run_task, cls._train = timed_run_task, slow_train


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fedtune.client.agent":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module.ClientAgent)

        spec.loader.exec_module = patched
        return spec


if SLOW:
    sys.meta_path.insert(0, _Hook())
'''


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- base and data
def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Pretrains the base (or reuses OUT/base), writes the pool, eval set and each ALPHA's partitions."""
    import torch

    torch.set_num_threads(1)
    from peft_methods import pretrain_base

    from fedtune.data import load_jsonl, write_synthetic_federation
    from fedtune.simulation.partition import partition, write_partitions

    base = args.out / "base"
    meta = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "seed": SEED,
            "pretrain_steps": args.pretrain_steps, "pretrain_batch": 32, "pretrain_lr": 3e-3}
    meta_file = args.out / "base.json"
    if (base / "config.json").exists() and meta_file.exists() and json.loads(meta_file.read_text()).get("settings") == meta:
        base_info = json.loads(meta_file.read_text())["info"]
        progress(f"reusing the pretrained base in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
        progress(f"pretraining the base ({args.layers} blocks, hidden {args.hidden}, {args.pretrain_steps} steps)")
        base_info = pretrain_base(base, argparse.Namespace(**meta))
        meta_file.write_text(json.dumps({"settings": meta, "info": base_info}))
    files, eval_file = write_synthetic_federation(work / "synthetic", 5, args.pool // 5, args.eval_examples, seed=SEED)
    held_out = {e.prompt for e in load_jsonl(eval_file)}
    pool = work / "pool.jsonl"
    lines = [line for f in files for line in f.read_text().splitlines()
             if json.loads(line)["prompt"] not in held_out]
    pool.write_text("".join(line + "\n" for line in lines))
    parts = {alpha: write_partitions(partition(pool, N_CLIENTS, f"dirichlet:{alpha}", seed=SEED),
                                     work / f"clients-{alpha}") for alpha in args.alphas}
    sizes = {alpha: [len(p.read_text().splitlines()) for p in paths] for alpha, paths in parts.items()}
    return {"base": base, "base_info": base_info, "pool": pool, "pool_size": len(lines), "eval": eval_file,
            "partitions": parts, "sizes": sizes}


def training_settings(args: argparse.Namespace, data: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The job's ``training`` as its tasks carry it (the spec's, validated, plus ``rounds``)."""
    from fedtune.spec import parse_spec

    spec = parse_spec(make_spec(args, data, "probe", {}, rounds))
    return {**spec.training.model_dump(mode="json"), "rounds": rounds}


def make_spec(args: argparse.Namespace, data: dict[str, Any], name: str, aggregation: dict[str, Any],
              rounds: int) -> str:
    return SPEC.format(name=name, base=data["base"], r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                       targets=", ".join(LORA["target_modules"]), steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, seed=SEED, rounds=rounds,
                       clients=N_CLIENTS, eval_data=data["eval"], aggregation=json.dumps(aggregation))


def base_loss(data: dict[str, Any], args: argparse.Namespace) -> float:
    """The eval loss of the base with the job's initial adapter (LoRA B = 0: the base itself)."""
    import torch

    from fedtune.data import load_jsonl, tokenize
    from fedtune.models import load_causal_lm, load_tokenizer
    from fedtune.peft_io import build_peft_model
    from fedtune.training import evaluate_loss

    tokenizer = load_tokenizer(data["base"])
    model = build_peft_model(load_causal_lm(data["base"], torch.device("cpu")), r=LORA["r"], alpha=LORA["alpha"],
                             dropout=LORA["dropout"], target_modules=LORA["target_modules"], seed=SEED)
    items = tokenize(load_jsonl(data["eval"]), tokenizer, args.max_seq_len)
    return evaluate_loss(model, items, pad_id=tokenizer.pad_token_id, batch_size=args.batch_size,
                         device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------- fedtune simulate
def read_rounds(db_path: Path) -> list[dict[str, Any]]:
    """Each published round's times and metrics from the coordinator's state."""
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT round, opened, closed, metrics_json FROM rounds ORDER BY round").fetchall()
    finally:
        db.close()
    out = []
    for rnd, opened, closed, metrics_json in rows:
        m = json.loads(metrics_json or "{}")
        if closed is None or m.get("eval_loss") is None:
            continue
        out.append({"round": rnd, "opened": opened, "closed": closed, "eval_loss": m.get("eval_loss"),
                    "train_loss": m.get("train_loss"), "contributors": m.get("contributors"),
                    "staleness_mean": m.get("staleness_mean"), "staleness_max": m.get("staleness_max")})
    return out


def run_simulate(args: argparse.Namespace, data: dict[str, Any], alpha: float, label: str,
                 aggregation: dict[str, Any], rounds: int, work: Path, cpus: float,
                 env_extra: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """One ``fedtune simulate`` run; its rounds read back from the coordinator's state db."""
    run_dir = work / f"sim-{label}-a{alpha}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = run_dir / "job.yaml"
    spec.write_text(make_spec(args, data, label, aggregation, rounds))
    out = run_dir / "out"
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "fedtune", "simulate", "--config", str(spec),
           "--clients", str(N_CLIENTS), "--partition", f"dirichlet:{alpha}", "--data", str(data["pool"]),
           "--out", str(out), "--client-resources", f"cpus={cpus}"]
    env = _env({"OMP_NUM_THREADS": "1"})
    env.update(env_extra or {})  # after _env, which drops PYTHONPATH (part 3 sets one)
    log = run_dir / "simulate.log"
    try:
        if timeout is None:
            run = run_measured(cmd, log, env)
        else:
            run = run_with_timeout(cmd, log, env, timeout)
    except SystemExit as e:
        return {"error": str(e), "rounds": []}
    rounds_out = read_rounds(out / "coordinator" / "state.db") if (out / "coordinator" / "state.db").exists() else []
    ours = data["partitions"][alpha]
    theirs = [out / "clients-data" / p.name for p in ours]
    same = all(p.exists() for p in theirs) and digest(theirs) == digest(ours)
    result = {**run, "rounds": rounds_out, "partitions_identical": same}
    if not args.keep_work:
        shutil.rmtree(out, ignore_errors=True)
    return result


def run_with_timeout(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """As ``run_measured`` without the memory sampling, but its process group is stopped after
    ``timeout`` seconds (``timed_out`` then, and what the state db holds is still read)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # this run's own session: the simulate process and its Ray
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = None, True
    if rc not in (0, None):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); last lines of {log}:\n{tail}")
    return {"wall_seconds": time.perf_counter() - t0, "timed_out": timed_out}


# ---------------------------------------------------------------------------------------- Flower
def run_flower(args: argparse.Namespace, python: Path, data: dict[str, Any], alpha: float,
               runs: list[dict[str, Any]], rounds: int, work: Path) -> dict[str, Any]:
    """This script's ``_flower`` half in the Flower virtualenv: every strategy of one ALPHA, one after another."""
    plan = {"base": str(data["base"]), "eval": str(data["eval"]), "data_dir": str(data["partitions"][alpha][0].parent),
            "clients": N_CLIENTS, "rounds": rounds, "training": training_settings(args, data, rounds), "lora": LORA,
            "seed": SEED, "client_cpus": args.client_cpus, "runs": runs}
    plan_file = work / f"flower-plan-a{alpha}.json"
    plan_file.write_text(json.dumps(plan))
    result = work / f"flower-a{alpha}.json"
    cmd = [str(python), str(Path(__file__).resolve()), "_flower", "--plan", str(plan_file), "--result", str(result)]
    try:
        run = run_measured(cmd, work / f"flower-a{alpha}.log", _env({"OMP_NUM_THREADS": "1"}))
    except SystemExit as e:
        return {"error": str(e), "runs": {}}
    return {**run, **json.loads(result.read_text())}


def flower_main(argv: list[str]) -> None:
    """Runs each planned Flower simulation (inside the Flower virtualenv); writes their rounds as JSON."""
    p = argparse.ArgumentParser(prog="strategies.py _flower")
    p.add_argument("--plan", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    plan = json.loads(Path(a.plan).read_text())

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp import strategy as flower_strategies
    from flwr.simulation import run_simulation

    from fedtune.data import load_jsonl, tokenize
    from fedtune.models import load_causal_lm, load_tokenizer
    from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
    from fedtune.strategies.local import FedProxObjective
    from fedtune.strategies.local import begin as begin_objective
    from fedtune.training import count_steps, evaluate_loss, recipe_from_training, train_adapter

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    training, lora = plan["training"], plan["lora"]
    max_seq_len, batch = int(training["max_seq_len"]), int(training["batch_size"])

    def build(base: str) -> tuple[Any, Any]:
        tokenizer = load_tokenizer(Path(base))
        model = build_peft_model(load_causal_lm(Path(base), cpu), r=lora["r"], alpha=lora["alpha"],
                                 dropout=lora["dropout"], target_modules=lora["target_modules"], seed=plan["seed"])
        return tokenizer, model

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        # Per message, as a fedtune virtual client per task: read the share, load the base, wrap it
        # with LoRA, take the global adapter, train with the job's recipe and seed, send it back.
        cfg = msg.content["config"]
        t = json.loads(str(cfg["training_json"]))
        rnd = int(cfg["server-round"])
        pid = int(context.node_config["partition-id"])
        tokenizer, model = build(str(cfg["base"]))
        items = tokenize(load_jsonl(Path(str(cfg["data_dir"])) / f"client-{pid}.jsonl"), tokenizer, int(t["max_seq_len"]))
        load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
        steps = count_steps(len(items), int(t["batch_size"]), t.get("steps"), t.get("epochs"))
        objective = None
        if float(cfg.get("proximal-mu", 0.0)) > 0:  # Flower's FedProx sends mu; the client applies it
            objective = FedProxObjective(float(cfg["proximal-mu"]))
            begin_objective(objective, model)
        result = train_adapter(model, items, pad_id=tokenizer.pad_token_id, lr=float(t["lr"]),
                               batch_size=int(t["batch_size"]), steps=t.get("steps"), epochs=t.get("epochs"),
                               seed=int(t.get("seed", 0)) + rnd, device=cpu, progress=False,
                               recipe=recipe_from_training(t, round_no=rnd, steps=steps, device=cpu),
                               objective=objective)
        metrics = MetricRecord({"num-examples": result.num_examples, "train_loss": result.mean_loss})
        return Message(RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": metrics}), reply_to=msg)

    out: dict[str, Any] = {"runs": {}, "flwr_version": _version("flwr"), "ray_version": _version("ray")}
    for run in plan["runs"]:
        marks: list[float] = []
        evals: list[float] = []
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context, run: dict[str, Any] = run,
                 marks: list[float] = marks, evals: list[float] = evals) -> None:
            tokenizer, model = build(plan["base"])
            eval_set = tokenize(load_jsonl(Path(plan["eval"])), tokenizer, max_seq_len)

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                load_adapter_state(model, arrays.to_torch_state_dict())
                loss = evaluate_loss(model, eval_set, pad_id=tokenizer.pad_token_id, batch_size=batch, device=cpu)
                evals.append(loss)
                marks.append(time.time())
                return MetricRecord({"eval_loss": loss})

            cls = getattr(flower_strategies, run["strategy"])
            strategy = cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=plan["clients"],
                           min_available_nodes=plan["clients"], **run["kwargs"])
            strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(model)), num_rounds=plan["rounds"],
                           train_config=ConfigRecord({"data_dir": plan["data_dir"], "base": plan["base"],
                                                      "training_json": json.dumps(training)}),
                           evaluate_fn=evaluate)

        scratch = tempfile.mkdtemp(prefix="flray-", dir="/tmp")
        t0 = time.perf_counter()
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=plan["clients"],
                           backend_config={"init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                                         "_temp_dir": scratch, "log_to_driver": False},
                                           "client_resources": {"num_cpus": plan["client_cpus"], "num_gpus": 0.0}})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        wall = time.perf_counter() - t0
        # marks[0]: the evaluation of the initial adapter; marks[r]: the end of round r.
        rounds = [{"round": r, "eval_loss": evals[r], "since_start": marks[r] - marks[0],
                   "seconds": marks[r] - marks[r - 1]} for r in range(1, len(marks))]
        out["runs"][run["label"]] = {"wall_seconds": wall, "initial_eval_loss": evals[0] if evals else None,
                                     "rounds": rounds, "complete": len(rounds) == plan["rounds"]}
        print(f"flower {run['label']}: {len(rounds)} rounds, final {evals[-1] if evals else None}, {wall:.0f} s",
              flush=True)
    Path(a.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------- part 2 harness
class Harness:
    """A federation in this process through the agent's client plan and training loop and the
    coordinator's ``next_global``; attackers send their delta sign-flipped and scaled."""

    def __init__(self, args: argparse.Namespace, data: dict[str, Any], rounds: int) -> None:
        import torch

        from fedtune.data import load_jsonl, tokenize
        from fedtune.methods import resolve_targets
        from fedtune.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(1)
        self.args, self.rounds, self.cpu = args, rounds, torch.device("cpu")
        self.tokenizer = load_tokenizer(data["base"])
        self.base = load_causal_lm(data["base"], self.cpu)
        self.evals = tokenize(load_jsonl(data["eval"]), self.tokenizer, args.max_seq_len)
        self.clients = {alpha: [tokenize(load_jsonl(p), self.tokenizer, args.max_seq_len) for p in paths]
                        for alpha, paths in data["partitions"].items()}
        self.cfg = resolve_targets({"method": "lora", **LORA, "lora_aggregation": "factors"},
                                   self.base.config.model_type)
        self.training = training_settings(args, data, rounds)

    def federate(self, alpha: float, strategy: str, options: dict[str, Any], attackers: int = 0,
                 seed: int = SEED) -> dict[str, Any]:
        import copy

        import torch

        from fedtune.coordinator.compute import next_global
        from fedtune.methods.client_plan import client_plan
        from fedtune.methods.lora import LoraAggregation
        from fedtune.peft_io import (
            adapter_state,
            build_peft_model,
            bytes_to_tensors,
            load_adapter_state,
            tensors_to_bytes,
        )
        from fedtune.strategies.base import StrategyRun
        from fedtune.training import count_steps, evaluate_loss, recipe_from_training, train_adapter

        t = {**self.training, "seed": seed}
        plan = client_plan(self.cfg)
        model = build_peft_model(copy.deepcopy(self.base), config=plan.peft_config(), seed=seed)
        plan.prepare(model)
        global_state = adapter_state(model)
        schema = {k: tuple(v.shape) for k, v in global_state.items()}
        blob = tensors_to_bytes(global_state, metadata={"format": "pt"})
        bad = {i * N_CLIENTS // attackers for i in range(attackers)}  # spread over the clients
        state: bytes | None = None
        losses, t0 = [], time.perf_counter()
        pad = self.tokenizer.pad_token_id
        for rnd in range(1, self.rounds + 1):
            plains, weights = [], []
            for i, items in enumerate(self.clients[alpha]):
                load_adapter_state(model, plan.start(global_state))
                steps = count_steps(len(items), int(t["batch_size"]), t.get("steps"), t.get("epochs"))
                result = train_adapter(model, items, pad_id=pad, lr=float(t["lr"]), batch_size=int(t["batch_size"]),
                                       steps=t.get("steps"), epochs=t.get("epochs"), seed=seed + rnd, device=self.cpu,
                                       progress=False, recipe=recipe_from_training(t, round_no=rnd, steps=steps,
                                                                                    device=self.cpu))
                trained = adapter_state(model)
                delta = plan.delta(trained, global_state, pad=False)
                plan.finish(trained)
                if i in bad:
                    delta = {k: (-self.args.attack_scale * v).contiguous() for k, v in delta.items()}
                plains.append(tensors_to_bytes(delta, metadata={"codec": "fp32"}))
                weights.append(result.num_examples)
            lora = LoraAggregation("factors", plan.job_rank, tuple([plan.job_rank] * len(plains)))
            run = StrategyRun(name=strategy, options=options, state=state, round=rnd, enrolled=N_CLIENTS)
            blob, state = next_global(blob, plains, weights, "fp32", schema, run, None, lora)
            global_state = bytes_to_tensors(blob)
            load_adapter_state(model, global_state)
            with torch.no_grad():
                losses.append(evaluate_loss(model, self.evals, pad_id=pad, batch_size=int(t["batch_size"]),
                                            device=self.cpu))
        return {"eval_loss_by_round": losses, "final": losses[-1], "seconds": time.perf_counter() - t0,
                "attackers": sorted(bad)}


# ---------------------------------------------------------------------------------------- summaries
def to_target(losses: list[float], target: float) -> int | None:
    """The first round (1-based) whose eval loss is at most ``target``."""
    return next((i + 1 for i, x in enumerate(losses) if x <= target), None)


def summarize_fedtune(run: dict[str, Any], target: float | None) -> dict[str, Any]:
    rounds = run.get("rounds") or []
    if not rounds:
        return {"error": run.get("error", "no rounds"), "final": None}
    losses = [r["eval_loss"] for r in rounds]
    start = rounds[0]["opened"]
    hit = to_target(losses, target) if target is not None else None
    per_round = [rounds[i]["closed"] - rounds[i - 1]["closed"] for i in range(1, len(rounds))]
    return {"final": losses[-1], "losses": losses, "rounds_to_target": hit,
            "seconds_to_target": rounds[hit - 1]["closed"] - start if hit else None,
            "round1_seconds": rounds[0]["closed"] - start, "later_seconds": _mean(per_round),
            "rounds_span": rounds[-1]["closed"] - start, "wall": run.get("wall_seconds"),
            "partitions_identical": run.get("partitions_identical"), "rounds": len(rounds)}


def summarize_flower(run: dict[str, Any] | None, target: float | None) -> dict[str, Any] | None:
    if not run or not run.get("rounds"):
        return None
    losses = [r["eval_loss"] for r in run["rounds"]]
    hit = to_target(losses, target) if target is not None else None
    return {"final": losses[-1], "losses": losses, "rounds_to_target": hit,
            "seconds_to_target": run["rounds"][hit - 1]["since_start"] if hit else None,
            "round1_seconds": run["rounds"][0]["seconds"], "later_seconds": _mean([r["seconds"] for r in run["rounds"][1:]]),
            "rounds_span": run["rounds"][-1]["since_start"], "wall": run["wall_seconds"],
            "initial": run.get("initial_eval_loss"), "complete": run.get("complete")}


def _opts(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items())


def render(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for alpha, table in result.get("strategy_table", {}).items():
        lines += [(f"#### Dirichlet {alpha}: base eval loss {table['base_loss']:.4f}, target {table['target']:.4f} "
                  f"({TARGET_FRACTION:.0%} of the way to fedtune FedAvg's final loss)"), "",
                  ("| strategy (options) | final eval loss fedtune / Flower | difference | rounds to target "
                  "fedtune / Flower | s to target fedtune / Flower | s/round (2+) fedtune / Flower | round 1 (s) "
                  "fedtune / Flower | total wall fedtune / Flower (s) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in table["rows"]:
            f, w = row["fedtune"], row.get("flower")
            if f.get("final") is None:
                lines.append(f"| {row['strategy']} ({_opts(row['options'])}) | failed: {f.get('error', '')[:80]} "
                             "| | | | | | |")
                continue
            diff = f"{w['final'] - f['final']:+.4f}" if w else "-"

            def pair(key: str, digits: int = 1, w: dict[str, Any] | None = w, f: dict[str, Any] = f) -> str:
                fv = f.get(key)
                left = "never" if fv is None and key.endswith("target") else _f(fv, digits)
                if w is None:
                    return f"{left} / -"
                wv = w.get(key)
                right = "never" if wv is None and key.endswith("target") else _f(wv, digits)
                return f"{left} / {right}"

            name = f"{row['strategy']} ({_opts(row['options'])})" if row["options"] else row["strategy"]
            flower_final = f"{w['final']:.4f}" if w else f"- ({row.get('flower_note', 'no Flower strategy')})"
            lines.append(f"| {name} | {f['final']:.4f} / {flower_final} | {diff} | {pair('rounds_to_target', 0)} | "
                         f"{pair('seconds_to_target')} | {pair('later_seconds')} | {pair('round1_seconds')} | "
                         f"{pair('wall', 0)} |")
        lines.append("")
    noise = result.get("noise")
    if noise:
        lines += ["#### Seed noise and harness check (part 2's in-process FedAvg)", "",
                  "| Dirichlet | FedAvg final eval loss, seeds " + ", ".join(str(s) for s in noise["seeds"]) +
                  " | std | fedtune simulate FedAvg (seed 0) | harness − simulate |", "|---:|---|---:|---:|---:|"]
        for alpha, row in noise["by_alpha"].items():
            sim = row.get("simulate")
            lines.append(f"| {alpha} | {', '.join(f'{x:.4f}' for x in row['finals'])} | {row['std']:.4f} | "
                         f"{_f(sim, 4)} | {(row['finals'][0] - sim) if sim is not None else float('nan'):+.5f} |")
        lines.append("")
    byz = result.get("byzantine")
    if byz:
        lines += [(f"#### Byzantine clients (Dirichlet {byz['alpha']}, {byz['rounds']} rounds; attackers send "
                  f"-{byz['attack_scale']:g} x their delta; base eval loss {byz['base_loss']:.4f})"), "",
                  "| strategy (options) | " + " | ".join(f"{k} of {N_CLIENTS} attackers" for k in byz["attackers"]) + " |",
                  "|---|" + "---:|" * len(byz["attackers"])]
        for row in byz["rows"]:
            name = f"{row['strategy']} ({_opts(row['options'])})" if row["options"] else row["strategy"]
            lines.append(f"| {name} | " + " | ".join(_f(row["final"].get(str(k)), 4) for k in byz["attackers"]) + " |")
        lines.append("")
    asy = result.get("async")
    if asy:
        lines += ["#### Async vs sync with one client at a quarter of the others' speed", ""]
        if asy.get("skipped"):
            lines += [f"Skipped: {asy['skipped']}", ""]
        if asy.get("rows"):
            lines += [(f"Dirichlet {asy['alpha']}, FedAvg, target {asy['target']:.4f}, {asy['cpus']} CPU per "
                       f"virtual client; v0 slowed {asy['factor']:g}x by sleeping before its upload."), "",
                      ("| mode | versions | client updates | s to target (from round 1 open) | versions to target | "
                       "final eval loss | s per version (2+) | staleness mean / max | v0 sleeps (mean s) | "
                       "total wall (s) |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for row in asy["rows"]:
                s = row["summary"]
                if s.get("final") is None:
                    lines.append(f"| {row['mode']} | failed: {s.get('error', '')[:80]} | | | | | | | | |")
                    continue
                stale = (f"{row['staleness_mean']:.2f} / {row['staleness_max']:g}" if row["staleness_mean"] is not None
                         else "-")
                lines.append(f"| {row['mode']} | {s['rounds']} | {row['updates']} | "
                             f"{_f(s['seconds_to_target']) if s['seconds_to_target'] else 'never'} | "
                             f"{s['rounds_to_target'] or 'never'} | {s['final']:.4f} | {_f(s['later_seconds'])} | "
                             f"{stale} | {row['slow_sleeps']} ({_f(row['slow_sleep_mean'])}) | "
                             f"{_f(s['wall'], 0)}{' (timed out)' if row['timed_out'] else ''} |")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- parts
def part_table(args: argparse.Namespace, data: dict[str, Any], python: Path | None, work: Path,
               base: float, result: dict[str, Any]) -> None:
    chosen = [s for s in STRATEGIES if s[0] in args.strategy_list]
    result["strategy_table"] = {}
    for alpha in args.alphas:
        runs: dict[str, dict[str, Any]] = {}
        for name, options, _, _ in chosen:
            progress(f"alpha {alpha}: fedtune simulate {name} {options or ''} (load {load_average()})")
            runs[name] = run_simulate(args, data, alpha, name, {"strategy": name, "options": options}, args.rounds,
                                      work, args.client_cpus)
            if runs[name].get("error"):
                progress(f"  failed: {runs[name]['error'][:300]}")
            else:
                progress(f"  final eval loss {runs[name]['rounds'][-1]['eval_loss']:.4f}, wall "
                         f"{runs[name]['wall_seconds']:.0f} s, partitions identical {runs[name]['partitions_identical']}")
        flower: dict[str, Any] = {"runs": {}}
        flower_runs = [{"label": name, "strategy": cls, "kwargs": kwargs} for name, _, cls, kwargs in chosen if cls]
        if python is not None and flower_runs:
            progress(f"alpha {alpha}: Flower {', '.join(r['strategy'] for r in flower_runs)} (load {load_average()})")
            flower = run_flower(args, python, data, alpha, flower_runs, args.rounds, work)
            if flower.get("error"):
                progress(f"  Flower failed: {flower['error'][:300]}")
        fedavg = summarize_fedtune(runs.get("fedavg", {}), None)
        target = base - TARGET_FRACTION * (base - fedavg["final"]) if fedavg.get("final") is not None else -math.inf
        rows = []
        for name, options, cls, kwargs in chosen:
            row = {"strategy": name, "options": options, "flower_class": cls, "flower_kwargs": kwargs,
                   "fedtune": summarize_fedtune(runs[name], target),
                   "flower": summarize_flower(flower.get("runs", {}).get(name), target)}
            if cls is None:
                row["flower_note"] = "Flower has no SCAFFOLD"
            elif python is None:
                row["flower_note"] = "Flower side not run"
            rows.append(row)
        result["strategy_table"][str(alpha)] = {"base_loss": base, "target": target, "rows": rows,
                                                "flower_versions": {k: flower.get(k) for k in ("flwr_version", "ray_version")},
                                                "flower_process_wall": flower.get("wall_seconds")}


def part_byzantine(args: argparse.Namespace, data: dict[str, Any], base: float, result: dict[str, Any]) -> None:
    harness = Harness(args, data, args.rounds)
    alpha = args.byzantine_alpha
    chosen = [b for b in BYZANTINE if b[0] in args.byzantine_list]
    rows = []
    for name, options in chosen:
        row: dict[str, Any] = {"strategy": name, "options": options, "final": {}, "curves": {}}
        for k in args.attackers:
            run = harness.federate(alpha, name, options, attackers=k)
            row["final"][str(k)], row["curves"][str(k)] = run["final"], run["eval_loss_by_round"]
            row.setdefault("attacker_ids", {})[str(k)] = run["attackers"]
            progress(f"byzantine {name} {options or ''}: {k} attackers -> {run['final']:.4f} ({run['seconds']:.0f} s)")
        rows.append(row)
    result["byzantine"] = {"alpha": alpha, "rounds": args.rounds, "attack_scale": args.attack_scale,
                           "attackers": list(args.attackers), "base_loss": base, "rows": rows}
    # Seed noise (FedAvg, no attacker) and the check that the harness is fedtune simulate's FedAvg.
    noise: dict[str, Any] = {"seeds": [SEED, *args.noise_seeds], "by_alpha": {}}
    for a in args.alphas:
        finals = []
        for seed in [SEED, *args.noise_seeds]:
            if a == alpha and seed == SEED and rows and rows[0]["strategy"] == "fedavg" and "0" in rows[0]["final"]:
                finals.append(rows[0]["final"]["0"])
                continue
            finals.append(harness.federate(a, "fedavg", {}, seed=seed)["final"])
        table = result.get("strategy_table", {}).get(str(a), {})
        sim = next((r["fedtune"].get("final") for r in table.get("rows", []) if r["strategy"] == "fedavg"), None)
        noise["by_alpha"][str(a)] = {"finals": finals, "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                                     "simulate": sim}
        progress(f"noise alpha {a}: FedAvg finals {[f'{x:.4f}' for x in finals]}, simulate {sim}")
    result["noise"] = noise


def part_async(args: argparse.Namespace, data: dict[str, Any], work: Path, base: float, result: dict[str, Any]) -> None:
    alpha = args.async_alpha
    agg_async = {"strategy": "fedavg", "mode": "async",
                 "async": {"buffer": args.async_buffer, "staleness_exponent": 0.5}}
    out: dict[str, Any] = {"alpha": alpha, "cpus": args.async_cpus, "factor": args.slow_factor,
                           "buffer": args.async_buffer}
    result["async"] = out
    try:
        from fedtune.spec import parse_spec

        parse_spec(make_spec(args, data, "async-check", agg_async, args.rounds))
    except Exception as e:  # noqa: BLE001 - any refusal means this fedtune has no async mode yet
        out["skipped"] = f"this fedtune refuses the spec with aggregation.mode async: {str(e).splitlines()[0][:300]}"
        progress(f"async: {out['skipped']}")
        return
    table = result.get("strategy_table", {}).get(str(alpha))
    if table and math.isfinite(table["target"]):
        target = table["target"]
    else:
        fedavg = Harness(args, data, args.rounds).federate(alpha, "fedavg", {})
        target = base - TARGET_FRACTION * (base - fedavg["final"])
    out["target"] = target
    hook = work / "slow-client"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_CLIENT_HOOK)
    versions = math.ceil(args.rounds * N_CLIENTS / args.async_buffer)  # the sync runs' number of updates
    runs = [("sync, no slow client", "sync-fast", {"strategy": "fedavg"}, args.rounds, False),
            ("sync, v0 at 1/4 speed", "sync-slow", {"strategy": "fedavg"}, args.rounds, True),
            (f"async (buffer {args.async_buffer}), v0 at 1/4 speed", "async-slow", agg_async, versions, True)]
    rows = []
    sync_wall = None
    for mode, label, aggregation, rounds, slow in runs:
        if args.quick and not slow:
            continue
        sleeps = work / f"slow-client-{label}.log"
        env = {"PYTHONPATH": str(hook), "STRATEGIES_SLOW_CLIENT": "v0", "STRATEGIES_SLOW_FACTOR": str(args.slow_factor),
               "STRATEGIES_SLOW_LOG": str(sleeps)} if slow else {}
        progress(f"async part: {mode}, {rounds} versions (load {load_average()})")
        # The slow sync run bounds the async one: at most 3x its time (plus start-up) before it counts
        # as not working here.
        timeout = 3 * sync_wall + 120 if "async" in label and sync_wall else None
        run = run_simulate(args, data, alpha, label, aggregation, rounds, work, args.async_cpus, env_extra=env,
                           timeout=timeout)
        if label == "sync-slow":
            sync_wall = run.get("wall_seconds")
        summary = summarize_fedtune(run, target)
        rr = run.get("rounds") or []
        pauses = [float(line.split()[2]) for line in sleeps.read_text().splitlines()] if sleeps.exists() else []
        stale = [r["staleness_mean"] for r in rr if r.get("staleness_mean") is not None]
        rows.append({"mode": mode, "rounds_planned": rounds, "timed_out": bool(run.get("timed_out")),
                     "updates": int(sum(r.get("contributors") or 0 for r in rr)),
                     "contributors_per_version": [r.get("contributors") for r in rr],
                     "staleness_mean": _mean(stale), "staleness_max": max((r.get("staleness_max") or 0 for r in rr),
                                                                          default=None),
                     "slow_sleeps": len(pauses), "slow_sleep_mean": _mean(pauses), "summary": summary})
        progress(f"  {summary.get('final')} final, {summary.get('seconds_to_target')} s to target, "
                 f"wall {run.get('wall_seconds')}{' (timed out)' if run.get('timed_out') else ''}, "
                 f"v0 slept {len(pauses)} times")
    if rows[-1]["summary"].get("final") is None:
        out["skipped"] = (f"fedtune accepts aggregation.mode async but its simulate published no version "
                          f"({rows[-1]['summary'].get('error', 'timed out')})"[:400])
    out["rows"] = rows


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (~5 min): Dirichlet 1.0 only, {', '.join(QUICK_STRATEGIES)}, 3 rounds, "
                        "fedavg/fedmedian with 0 and 2 attackers, a short async pair")
    p.add_argument("--parts", nargs="+", choices=["table", "byzantine", "async"], default=["table", "byzantine", "async"])
    p.add_argument("--alphas", type=float, nargs="+", default=None, help="Dirichlet alphas (default 0.1 1.0)")
    p.add_argument("--strategies", default=None, help="comma-separated subset of the strategy table")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 6; --quick 3)")
    p.add_argument("--steps", type=int, default=5, help="local optimizer steps per client per round")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--pool", type=int, default=640, help="examples in the pool split over the clients")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 300; --quick 100")
    p.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per virtual client, both sides, parts 1")
    p.add_argument("--attack-scale", type=float, default=10.0, help="attackers send -SCALE x their delta")
    p.add_argument("--byzantine-alpha", type=float, default=1.0)
    p.add_argument("--noise-seeds", type=int, nargs="*", default=None, help="extra FedAvg seeds (default 1 2; --quick none)")
    p.add_argument("--async-alpha", type=float, default=1.0)
    p.add_argument("--async-buffer", type=int, default=4)
    p.add_argument("--async-cpus", type=float, default=0.25, help="CPUs per virtual client in part 3 (both modes)")
    p.add_argument("--slow-factor", type=float, default=4.0)
    p.add_argument("--setup-flower", action="store_true", help=f"create {FLOWER_VENV} when missing")
    p.add_argument("--no-flower", action="store_true", help="fedtune's side only")
    p.add_argument("--flower-venv", type=Path, default=FLOWER_VENV)
    p.add_argument("--keep-work", action="store_true", help="keep fedtune's state dirs under OUT/work")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "strategies")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.alphas = args.alphas or ([1.0] if args.quick else [0.1, 1.0])
    args.rounds = args.rounds or (3 if args.quick else 6)
    args.pretrain_steps = args.pretrain_steps or (100 if args.quick else 300)
    names = [s[0] for s in STRATEGIES]
    args.strategy_list = ([s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies
                          else list(QUICK_STRATEGIES) if args.quick else names)
    unknown = [s for s in args.strategy_list if s not in names]
    if unknown:
        p.error(f"unknown strategies {unknown}; known: {', '.join(names)}")
    if "fedavg" not in args.strategy_list:
        args.strategy_list.insert(0, "fedavg")  # the target comes from it
    args.byzantine_list = ["fedavg", "fedmedian"] if args.quick else [b[0] for b in BYZANTINE]
    args.attackers = (0, 2) if args.quick else ATTACKERS
    args.noise_seeds = args.noise_seeds if args.noise_seeds is not None else ([] if args.quick else [1, 2])
    if args.quick:
        args.async_buffer = max(args.async_buffer, 8)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_flower":
        flower_main(argv[1:])
        return
    args = parse_args(argv)
    python: Path | None = None
    if "table" in args.parts and not args.no_flower:
        python = args.flower_venv / "bin" / "python"
        if args.setup_flower:
            python = setup_flower_venv(args.flower_venv)
        elif not python.exists():
            raise SystemExit(f"no Flower virtualenv at {args.flower_venv}: rerun with --setup-flower (see "
                             "benchmarks/simulation_vs_flower.py), or --no-flower for fedtune's side only")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "load_start": load_average(),
                              "settings": {k: v if isinstance(v, (int, float, list, tuple, bool, type(None))) else str(v)
                                           for k, v in vars(args).items()}}
    import torch
    import transformers

    result["machine"].update({"torch": torch.__version__, "transformers": transformers.__version__})
    data = prepare(args, work)
    base = base_loss(data, args)
    result["data"] = {"pool": data["pool_size"], "eval": args.eval_examples,
                      "client_sizes": {str(k): v for k, v in data["sizes"].items()}, "base": data["base_info"],
                      "base_eval_loss": base}
    progress(f"base eval loss {base:.4f}; client sizes {data['sizes']}")
    for part in ("table", "byzantine", "async"):
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        if part == "table":
            part_table(args, data, python, work, base, result)
        elif part == "byzantine":
            part_byzantine(args, data, base, result)
        else:
            part_async(args, data, work, base, result)
        result.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        (args.out / "strategies.json").write_text(json.dumps(result, indent=1, default=str))
    result["seconds"] = time.perf_counter() - started
    result["load_end"] = load_average()
    text = render(result)
    print(text)
    (args.out / "strategies.md").write_text(text + "\n")
    (args.out / "strategies.json").write_text(json.dumps(result, indent=1, default=str))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'strategies.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
