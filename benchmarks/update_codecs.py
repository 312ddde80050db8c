"""Update codecs on one small federated job: bytes each client sends per round against the final loss.

The same job runs in this process once per codec (no gRPC, no envelopes): K clients with non-IID
data from ``fedtune.data.write_synthetic_federation`` each train a rank-8 LoRA on ``q_proj``,
``v_proj`` and ``lm_head`` of the tiny preset (or ``--base``) for a few steps from the global
adapter, then do what fedtune's client agent does with the delta::

    delta = feedback.apply(delta)           # codecs that are not additive (all but fp32) carry a residual
    wire = codec.encode(delta)
    feedback.update(codec.decode(wire, schema), delta)
    blob = tensors_to_bytes(wire)           # the bytes that travel (before the envelope's 60 B)

and the coordinator checks and decodes every blob and applies FedAvg weighted by examples. Data,
adapter init, batch order and int8's stochastic rounding are seeded the same for every codec, and
the whole comparison repeats over ``--seeds`` seeds (10 by default: this job's final loss moves by
about 1% under a perturbation as small as fp16 rounding, so three seeds cannot resolve a 1% bar).
The verdict is given on the mean paired gap to fp32, and again on that mean plus two standard
errors. A second table splits the blob of every codec into tensor data and safetensors header, for
this adapter and for the 294,912-value adapter of a 12-layer, 768-wide Llama (q_proj and v_proj, r = 8).

    python benchmarks/update_codecs.py --threads 1 --out benchmarks/out/codecs.json

Prints markdown tables and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from fedtune.compression.codecs import get_codec, wire_bytes
from fedtune.compression.feedback import ErrorFeedback
from fedtune.data import load_jsonl, tokenize, write_synthetic_federation
from fedtune.models import load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import (
    adapter_state,
    build_peft_model,
    bytes_to_tensors,
    load_adapter_state,
    tensors_to_bytes,
)
from fedtune.strategies import WeightedDelta, get_strategy
from fedtune.training import evaluate_loss, train_adapter

log = logging.getLogger("codecs")
CPU = torch.device("cpu")
CODECS = ["fp32", "fp16", "bf16", "int8", "int4", "int2", "topk:0.05", "topk:0.5+int4", "topk:0.3+int8"]
NO_FEEDBACK = "/no-feedback"  # suffix of a codec run without error feedback, to show what it buys
MAX_SEQ_LEN = 64
BYTES_GOAL, LOSS_GOAL = 8.0, 0.01  # at least 8x fewer bytes than fp32, final loss within 1% of fp32's


def run_job(codec_name: str, model: torch.nn.Module, clients: list[list[dict[str, list[int]]]],
            evals: list[dict[str, list[int]]], init: dict[str, torch.Tensor], pad_id: int,
            args: argparse.Namespace, seed: int, state_dir: Path) -> dict[str, Any]:
    """One federated job with one codec; returns bytes per client per round and the eval loss after each round."""
    use_feedback = not codec_name.endswith(NO_FEEDBACK)
    codec = get_codec(codec_name.removesuffix(NO_FEEDBACK))
    schema = {k: tuple(v.shape) for k, v in init.items()}
    feedback = [ErrorFeedback(state_dir / f"client_{i}.safetensors") if use_feedback and not codec.additive else None
                for i in range(len(clients))]
    strategy = get_strategy("fedavg")
    global_state = {k: v.clone() for k, v in init.items()}
    blob_sizes: list[int] = []
    data_sizes: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    for rnd in range(args.rounds):
        updates = []
        for i, items in enumerate(clients):
            load_adapter_state(model, global_state)
            # As the agent: seed + round for the batch order (the clients' data differ).
            result = train_adapter(model, items, pad_id=pad_id, lr=args.lr, batch_size=args.batch, steps=args.steps,
                                   epochs=None, seed=seed + rnd, device=CPU, progress=False)
            trained = adapter_state(model)
            delta = {k: trained[k] - global_state[k] for k in global_state}
            if feedback[i] is not None:
                delta = feedback[i].apply(delta)
            if codec.name == "int8":  # stochastic rounding, seeded so every run sees the same draws
                wire = codec.encode(delta, generator=torch.Generator().manual_seed(seed * 10_000 + rnd * 100 + i))  # type: ignore[call-arg]
            else:
                wire = codec.encode(delta)
            if feedback[i] is not None:
                feedback[i].update(codec.decode(wire, schema), delta)
            blob = tensors_to_bytes(wire, metadata={"codec": codec.name})
            blob_sizes.append(len(blob))
            data_sizes.append(wire_bytes(wire))
            received = bytes_to_tensors(blob)
            codec.check(received, schema)
            updates.append(WeightedDelta(codec.decode(received, schema), result.num_examples))
        avg = strategy.combine(updates)
        global_state = {k: global_state[k] + avg[k] for k in global_state}
        load_adapter_state(model, global_state)
        losses.append(evaluate_loss(model, evals, pad_id=pad_id, batch_size=64, device=CPU))
    return {"codec": codec_name, "seed": seed, "feedback": any(f is not None for f in feedback),
            "bytes_per_client_round": statistics.fmean(blob_sizes), "bytes_min": min(blob_sizes),
            "bytes_max": max(blob_sizes), "data_bytes_per_client_round": statistics.fmean(data_sizes),
            "eval_loss_by_round": losses, "final_loss": losses[-1], "seconds": time.perf_counter() - start}


def header_overhead(adapters: dict[str, dict[str, torch.Tensor]], codecs: list[str]) -> list[dict[str, Any]]:
    """Blob bytes of one update split into tensor data and safetensors header, per codec and adapter."""
    rows = []
    for adapter, delta in adapters.items():
        fp32 = len(tensors_to_bytes(get_codec("fp32").encode(delta), metadata={"codec": "fp32"}))
        for name in codecs:
            codec = get_codec(name)
            wire = codec.encode(delta)
            blob = len(tensors_to_bytes(wire, metadata={"codec": codec.name}))
            rows.append({"adapter": adapter, "values": sum(v.numel() for v in delta.values()), "tensors": len(delta),
                         "codec": name, "blob_bytes": blob, "data_bytes": wire_bytes(wire),
                         "header_bytes": blob - wire_bytes(wire), "header_share": (blob - wire_bytes(wire)) / blob,
                         "reduction_vs_fp32": fp32 / blob, "reduction_vs_fp32_data_only": 4 * sum(
                             v.numel() for v in delta.values()) / wire_bytes(wire)})
    return rows


def llama_768_delta() -> dict[str, torch.Tensor]:
    """A rank-8 q_proj/v_proj LoRA delta of a 12-layer, 768-wide Llama, keyed as peft saves it (294,912 values)."""
    g = torch.Generator().manual_seed(0)
    return {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight":
            torch.randn((8, 768) if ab == "A" else (768, 8), generator=g) * 1e-3
            for i in range(12) for m in ("q_proj", "v_proj") for ab in ("A", "B")}


def summarize(runs: list[dict[str, Any]], codecs: list[str]) -> list[dict[str, Any]]:
    """Per codec: mean bytes, mean final loss, its paired gap to fp32 (mean, sd, standard error, worst) and the verdict.

    The goal is met on the mean paired gap; ``meets_goal_clearly`` asks the same of the gap's mean plus
    two standard errors, i.e. that the seeds leave little doubt.
    """
    fp32 = {r["seed"]: r for r in runs if r["codec"] == "fp32"}
    fp32_bytes = statistics.fmean(r["bytes_per_client_round"] for r in fp32.values())
    rows = []
    for name in codecs:
        mine = [r for r in runs if r["codec"] == name]
        finals = [r["final_loss"] for r in mine]
        gaps = [(r["final_loss"] - fp32[r["seed"]]["final_loss"]) / fp32[r["seed"]]["final_loss"] for r in mine]
        nbytes = statistics.fmean(r["bytes_per_client_round"] for r in mine)
        reduction = fp32_bytes / nbytes
        gap = statistics.fmean(gaps)
        gap_sd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        gap_se = gap_sd / len(gaps) ** 0.5
        rows.append({"codec": name, "feedback": mine[0]["feedback"], "bytes_per_client_round": nbytes,
                     "data_bytes_per_client_round": statistics.fmean(r["data_bytes_per_client_round"] for r in mine),
                     "reduction_vs_fp32": reduction, "final_loss": statistics.fmean(finals),
                     "final_loss_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "gap_vs_fp32": gap, "gap_vs_fp32_sd": gap_sd, "gap_vs_fp32_se": gap_se,
                     "gap_vs_fp32_worst_seed": max(gaps), "seeds": len(mine),
                     "meets_goal": reduction >= BYTES_GOAL and gap <= LOSS_GOAL,
                     "meets_goal_clearly": reduction >= BYTES_GOAL and gap + 2 * gap_se <= LOSS_GOAL})
    return rows


def _verdict(row: dict[str, Any]) -> str:
    if row["meets_goal_clearly"]:
        return "PASS"
    return "pass (mean only)" if row["meets_goal"] else "fail"


def _md(result: dict[str, Any]) -> str:
    s = result["settings"]
    fp32 = [r["final_loss"] for r in result["runs"] if r["codec"] == "fp32"]
    spread = (f"sd {statistics.stdev(fp32):.4f} ({statistics.stdev(fp32) / statistics.fmean(fp32):.1%} of the mean), "
              if len(fp32) > 1 else "")
    lines = [f"Initial eval loss {result['initial_loss']:.4f} (mean over seeds). fp32 final loss over "
             f"{len(fp32)} seeds: mean {statistics.fmean(fp32):.4f}, {spread}range {min(fp32):.4f}-{max(fp32):.4f}; "
             "by seed " + ", ".join(f"{x:.4f}" for x in fp32) + ".", "",
             (f"| codec | error feedback | bytes / client / round | of which tensor data | vs fp32 | "
             f"final eval loss (mean ± sd, {s['seeds']} seeds) | vs fp32, paired: mean ± sd (worst seed) | "
             f">= 8x and <= +1% (mean + 2 se) |"),
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['codec']} | {'yes' if r['feedback'] else 'no'} | {r['bytes_per_client_round']:,.0f} | "
                     f"{r['data_bytes_per_client_round']:,.0f} | {r['reduction_vs_fp32']:.1f}x | "
                     f"{r['final_loss']:.4f} ± {r['final_loss_sd']:.4f} | {r['gap_vs_fp32']:+.2%} ± "
                     f"{r['gap_vs_fp32_sd']:.2%} ({r['gap_vs_fp32_worst_seed']:+.2%}) | {_verdict(r)} |")
    lines += ["", ("| adapter | codec | blob bytes | tensor data | safetensors header | header share | "
              "vs fp32 blob | vs fp32, data only |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["header_overhead"]:
        lines.append(f"| {r['adapter']} ({r['values']:,} values, {r['tensors']} tensors) | {r['codec']} | "
                     f"{r['blob_bytes']:,} | {r['data_bytes']:,} | {r['header_bytes']:,} | {r['header_share']:.1%} | "
                     f"{r['reduction_vs_fp32']:.1f}x | {r['reduction_vs_fp32_data_only']:.1f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/out/codecs.json")
    p.add_argument("--base", default="tiny-llama",
                   help="tiny-llama, or a model directory such as benchmarks/out/offsite/base")
    p.add_argument("--codecs", nargs="+", default=CODECS)
    p.add_argument("--no-feedback", nargs="*", default=["topk:0.5+int4"],
                   help=f"codecs to run once more without error feedback (row '<codec>{NO_FEEDBACK}')")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=15, help="local steps per round")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--examples", type=int, default=64, help="examples per client")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "lm_head"])
    p.add_argument("--seeds", type=int, default=10, help="repetitions, each with its own data and seeds")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fedtune.training").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fedtune-codecs-"))
    try:
        base_dir = materialize_preset(args.base, work / "base") if args.base == "tiny-llama" else Path(args.base)
        tokenizer = load_tokenizer(base_dir)
        pad = tokenizer.pad_token_id
        model = build_peft_model(load_causal_lm(base_dir, CPU), r=args.r, alpha=2 * args.r, dropout=0.0,
                                 target_modules=args.targets, seed=0)
        variants = [*args.codecs, *(f"{c}{NO_FEEDBACK}" for c in args.no_feedback)]
        runs, initial = [], []
        tiny_delta: dict[str, torch.Tensor] = {}
        for seed in range(args.seeds):
            files, eval_file = write_synthetic_federation(work / f"data-{seed}", args.clients, args.examples,
                                                          args.eval_examples, seed=seed)
            clients = [tokenize(load_jsonl(f), tokenizer, MAX_SEQ_LEN) for f in files]
            evals = tokenize(load_jsonl(eval_file), tokenizer, MAX_SEQ_LEN)
            # The same initial adapter for every codec: peft's init (B = 0) drawn from this seed.
            fresh = build_peft_model(load_causal_lm(base_dir, CPU), r=args.r, alpha=2 * args.r, dropout=0.0,
                                     target_modules=args.targets, seed=seed)
            init = adapter_state(fresh)
            load_adapter_state(model, init)
            initial.append(evaluate_loss(model, evals, pad_id=pad, batch_size=64, device=CPU))
            for name in variants:
                state_dir = work / f"feedback-{seed}-{name.replace(':', '_').replace('/', '_')}"
                run = run_job(name, model, clients, evals, init, pad, args, seed, state_dir)
                runs.append(run)
                log.info("seed %d %-22s %7.0f B/client/round  final loss %.4f  (%.0fs)", seed, name,
                         run["bytes_per_client_round"], run["final_loss"], run["seconds"])
            if not tiny_delta:  # a real trained delta for the header table: the last global minus init
                load_adapter_state(model, init)
                train_adapter(model, clients[0], pad_id=pad, lr=args.lr, batch_size=args.batch, steps=args.steps,
                              epochs=None, seed=0, device=CPU, progress=False)
                tiny_delta = {k: v - init[k] for k, v in adapter_state(model).items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "runs": runs, "summary": summarize(runs, variants), "initial_loss": statistics.fmean(initial),
        "header_overhead": header_overhead({"this job": tiny_delta, "12x768 q,v r=8": llama_768_delta()}, args.codecs),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": args.threads},
    }
    result["seconds"] = time.perf_counter() - start
    passing = [r["codec"] for r in result["summary"] if r["meets_goal"]]
    clearly = [r["codec"] for r in result["summary"] if r["meets_goal_clearly"]]
    result["goal"] = {"bytes_reduction_at_least": BYTES_GOAL, "loss_gap_at_most": LOSS_GOAL,
                      "codecs_meeting_it": passing, "codecs_meeting_it_with_two_standard_errors": clearly}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(_md(result))
    print(f"\nGoal (>= {BYTES_GOAL:g}x fewer bytes than fp32, final loss within {LOSS_GOAL:.0%}), on the mean gap: "
          f"{', '.join(passing) or 'no codec'}; on the mean gap + 2 standard errors: {', '.join(clearly) or 'no codec'}. "
          f"{result['seconds']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
