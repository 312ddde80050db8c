"""Flower half of ``round_overhead.py``: a ServerApp (FedAvg) and a ClientApp for the deployment engine.

Runs in Flower's own virtualenv (``benchmarks/.flower-venv``), never in fedtune's. ``round_overhead.py``
copies this file into a generated Flower App directory next to a ``pyproject.toml`` whose
``[tool.flwr.app.config]`` carries the run's settings, starts a SuperLink and one SuperNode per client as
separate processes on loopback and submits the app with ``flwr run``. The SuperLink runs the ServerApp
in a ``flwr-serverapp`` process; each SuperNode runs the ClientApp in a fresh ``flwr-clientapp`` process
per message (Flower's subprocess isolation), so every round a client imports torch, loads the base from
disk and wraps it with LoRA before it trains.

The ClientApp trains with fedtune's own functions (``fedtune.models``, ``fedtune.data``,
``fedtune.peft_io``, ``fedtune.training``), as the fedtune client agent does; the ServerApp evaluates
each round's global adapter on the same held-out set with ``fedtune.training.evaluate_loss``, as the
fedtune coordinator does. Wall-clock marks (``time.time()``, one machine, so one clock) go back to the
ServerApp in each reply's metrics, and the ServerApp writes every mark to ``result-file`` as JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

_IMPORTED_AT = time.time()  # before torch: what follows is this process's import cost

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.data import load_jsonl, tokenize
from fedtune.models import load_causal_lm, load_tokenizer
from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
from fedtune.training import evaluate_loss, train_adapter

_READY_AT = time.time()
CPU = torch.device("cpu")


def process_started_at() -> float:
    """When this process was created (from /proc; 10 ms resolution), before the interpreter started."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return _IMPORTED_AT


def build(cfg: Any) -> tuple[Any, Any]:
    """Tokenizer and the base wrapped with the job's LoRA (the same call fedtune's agent makes)."""
    base = Path(str(cfg["model-dir"]))
    tokenizer = load_tokenizer(base)
    targets = [t for t in str(cfg["lora-targets"]).split(",") if t]
    model = build_peft_model(load_causal_lm(base, CPU), r=int(cfg["lora-r"]), alpha=float(cfg["lora-alpha"]),
                             dropout=float(cfg["lora-dropout"]), target_modules=targets, seed=int(cfg["seed"]))
    return tokenizer, model


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this node's share: load the base, take the global adapter, train, send it back."""
    handler_at = time.time()
    cfg = context.run_config
    torch.set_num_threads(int(cfg["client-threads"]))
    tokenizer, model = build(cfg)
    loaded_at = time.time()
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    files = str(cfg["data-files"]).split(",")
    examples = load_jsonl(Path(files[int(context.node_config["partition-id"])]))
    server_round = int(msg.content["config"]["server-round"])
    result = train_adapter(model, tokenize(examples, tokenizer, int(cfg["max-seq-len"])),
                           pad_id=tokenizer.pad_token_id, lr=float(cfg["lr"]), batch_size=int(cfg["batch-size"]),
                           steps=int(cfg["steps"]), epochs=None, seed=int(cfg["seed"]) + server_round, device=CPU,
                           progress=False)
    trained_at = time.time()
    arrays = ArrayRecord(adapter_state(model))
    metrics = MetricRecord({
        "num-examples": result.num_examples, "train_loss": float(result.mean_loss),
        "train_seconds": float(result.seconds), "partition_id": int(context.node_config["partition-id"]),
        "process_started_at": process_started_at(), "imported_at": _IMPORTED_AT, "ready_at": _READY_AT,
        "handler_at": handler_at, "loaded_at": loaded_at, "trained_at": trained_at, "replied_at": time.time(),
    })
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round is configured, when its replies are in and when it is averaged."""

    def __init__(self, marks: dict[int, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marks = marks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.marks.setdefault(server_round, {})["opened"] = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.marks[server_round]["sent"] = time.time()
        return messages

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mark = self.marks[server_round]
        mark["replies_in"] = time.time()
        mark["clients"] = [dict(r.content["metrics"]) for r in replies if r.has_content()]
        mark["errors"] = [str(r.error) for r in replies if r.has_error()]
        out = super().aggregate_train(server_round, replies)
        mark["aggregated"] = time.time()
        return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every node for ``rounds`` rounds, evaluating each global adapter; marks to JSON."""
    cfg = context.run_config
    started = time.time()
    tokenizer, model = build(cfg)
    eval_set = (tokenize(load_jsonl(Path(str(cfg["eval-file"]))), tokenizer, int(cfg["max-seq-len"]))
                if str(cfg["eval-file"]) else None)
    initial = adapter_state(model)
    loaded = time.time()
    marks: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, float]] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        t0 = time.time()
        if eval_set is None:
            evals[server_round] = {"start": t0, "end": t0, "loss": float("nan")}
            return None
        load_adapter_state(model, arrays.to_torch_state_dict())
        loss = evaluate_loss(model, eval_set, pad_id=tokenizer.pad_token_id, batch_size=int(cfg["batch-size"]),
                             device=CPU)
        evals[server_round] = {"start": t0, "end": time.time(), "loss": float(loss)}
        return MetricRecord({"eval_loss": float(loss)})

    clients = int(cfg["clients"])
    strategy = TimedFedAvg(marks, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                           min_available_nodes=clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=int(cfg["rounds"]),
                   train_config=ConfigRecord({}), evaluate_fn=evaluate, timeout=float(cfg["round-timeout"]))
    result = {"started": started, "model_loaded": loaded, "finished": time.time(),
              "adapter_bytes": sum(t.numel() * t.element_size() for t in initial.values()),
              "rounds": {str(k): v for k, v in marks.items()}, "evals": {str(k): v for k, v in evals.items()}}
    path = Path(str(cfg["result-file"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
