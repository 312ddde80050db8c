"""Batched multi-adapter training (issue 5 b): K LoRA adapters in one pass of the base vs one after another.

Both sides do the same work: K adapters (rank 8 on ``q_proj`` and ``v_proj``), each with its own
client's data, ``--steps`` optimizer steps of ``--batch-size`` examples, same seeds. *Sequential*
is what K isolated clients do: per adapter, load the base, wrap it with peft and run
``fedtune.training.train_adapter``. *Batched* is ``fedtune.batching.train_batched``: one base, the
K mini-batches concatenated, one forward and one backward per step. Throughput is training samples
per second of the training loops (model loading excluded on both sides); each (mode, K) runs in a
fresh process, so its peak RSS is its own, and the modes alternate over ``--repeats`` repetitions
(medians reported). The base is a randomly initialised Llama (default hidden 512, 8 layers, MLP
1536, 8 heads, the tiny preset's 100-token character vocabulary: ~25 M parameters in the blocks), big
enough that the base's matmuls dominate a step. The batched adapters' weights are checked against
the sequential ones.

    python benchmarks/batched_adapters.py --out benchmarks/out/batched_adapters.json

Prints a markdown table and writes every figure, the machine and the settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from fedtune.batching import AdapterSpec, TrainingPlan, train_batched
from fedtune.data import load_jsonl, tokenize, write_synthetic_federation
from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model, lora_config, tensors_to_bytes
from fedtune.training import train_adapter

CPU = torch.device("cpu")
BASE_ID = "batched-adapters-bench"
TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA, LR = 8, 16, 1e-3


def build_base(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the tiny preset's tokenizer, saved as an ordinary model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = out / f"base-h{hidden}-l{layers}"
    if (base / "model.safetensors").exists():
        return base
    preset = materialize_preset(TINY_PRESET, out / "preset")
    tokenizer = load_tokenizer(preset)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    return base


def client_data(base: Path, data_dir: Path, k: int, max_seq_len: int) -> tuple[int, list[list[dict[str, list[int]]]]]:
    """(pad id, tokenized examples of clients 0..k-1)."""
    tokenizer = load_tokenizer(base)
    files = [data_dir / f"client_{i}.jsonl" for i in range(k)]
    return tokenizer.pad_token_id, [tokenize(load_jsonl(f), tokenizer, max_seq_len) for f in files]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (mode, K) run in this process; returns its figures."""
    torch.set_num_threads(args.threads)
    base = Path(args.base_dir)
    pad_id, data = client_data(base, Path(args.data_dir), args.k, args.max_seq_len)
    config = lora_config(RANK, ALPHA, 0.0, TARGETS)
    states: list[dict[str, torch.Tensor]] = []
    losses: list[float] = []
    loop_seconds = 0.0
    if args.worker == "sequential":
        for k in range(args.k):
            model = build_peft_model(load_causal_lm(base, CPU), r=RANK, alpha=ALPHA, dropout=0.0,
                                     target_modules=TARGETS, seed=k)
            result = train_adapter(model, data[k], pad_id=pad_id, lr=LR, batch_size=args.batch_size, steps=args.steps,
                                   epochs=None, seed=k, device=CPU, progress=False)
            loop_seconds += result.seconds
            states.append(adapter_state(model))
            losses.append(result.final_loss)
            del model
    else:
        specs = [AdapterSpec(BASE_ID, config, init_seed=k) for k in range(args.k)]
        plans = [TrainingPlan(data[k], lr=LR, batch_size=args.batch_size, steps=args.steps, seed=k)
                 for k in range(args.k)]
        runs = train_batched(load_causal_lm(base, CPU), BASE_ID, specs, plans, pad_id=pad_id, device=CPU)
        loop_seconds = runs[0].result.seconds
        states = [run.state for run in runs]
        losses = [run.result.final_loss for run in runs]
    state_file = Path(args.state_out)
    state_file.write_bytes(tensors_to_bytes({f"{k}/{name}": v for k, s in enumerate(states) for name, v in s.items()}))
    samples = args.k * args.steps * args.batch_size
    return {"mode": args.worker, "k": args.k, "loop_seconds": loop_seconds, "samples": samples,
            "samples_per_second": samples / loop_seconds, "final_losses": losses,
            # ru_maxrss is KiB on Linux.
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(args: argparse.Namespace, mode: str, k: int, base: Path, data_dir: Path, state_out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode, "--k", str(k), "--base-dir", str(base),
           "--data-dir", str(data_dir), "--state-out", str(state_out), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} K={k} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    return max(float((sa[key] - sb[key]).abs().max()) for key in sa)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    out_dir = Path(args.out).parent / "batched_adapters"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_base(out_dir, args.hidden, args.layers)
    data_dir = out_dir / "data"
    if not (data_dir / f"client_{max(args.ks) - 1}.jsonl").exists():
        write_synthetic_federation(data_dir, max(args.ks), examples_per_client=64)
    n_params = sum(p.numel() for p in load_causal_lm(base, CPU).parameters())
    runs: list[dict[str, Any]] = []
    started = time.time()
    for rep in range(args.repeats):
        for k in args.ks:
            # Alternate which mode goes first, so drift in the machine's load hits both alike.
            modes = ("sequential", "batched") if rep % 2 == 0 else ("batched", "sequential")
            for mode in modes:
                run = run_worker(args, mode, k, base, data_dir, out_dir / f"{mode}-k{k}.safetensors")
                run["repeat"] = rep
                runs.append(run)
                print(f"rep {rep} K={k} {mode:10s} {run['samples_per_second']:7.2f} samples/s "
                      f"({run['loop_seconds']:.1f}s), peak RSS {run['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    rows = []
    for k in args.ks:
        seq = [r for r in runs if r["k"] == k and r["mode"] == "sequential"]
        bat = [r for r in runs if r["k"] == k and r["mode"] == "batched"]
        seq_sps = statistics.median(r["samples_per_second"] for r in seq)
        bat_sps = statistics.median(r["samples_per_second"] for r in bat)
        # Per repeat, the ratio of the two runs next to each other: how much the speedup varies.
        ratios = [b["samples_per_second"] / s["samples_per_second"] for s, b in zip(seq, bat, strict=True)]
        rows.append({"k": k, "sequential_samples_per_second": seq_sps, "batched_samples_per_second": bat_sps,
                     "speedup": bat_sps / seq_sps, "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "sequential_peak_rss_mib": max(r["peak_rss_mib"] for r in seq),
                     "batched_peak_rss_mib": max(r["peak_rss_mib"] for r in bat),
                     "max_weight_diff": max_weight_diff(out_dir / f"sequential-k{k}.safetensors",
                                                        out_dir / f"batched-k{k}.safetensors"),
                     "goal_met": bat_sps / seq_sps >= 1.2})
    result = {
        "date": datetime.now().isoformat(timespec="seconds"), "seconds": time.time() - started,
        "settings": {"hidden": args.hidden, "layers": args.layers, "base_parameters": n_params, "rank": RANK,
                     "targets": TARGETS, "steps": args.steps, "batch_size": args.batch_size,
                     "max_seq_len": args.max_seq_len, "repeats": args.repeats, "threads": args.threads},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "rows": rows, "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(_md(result))


def _md(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [(f"Base {s['base_parameters'] / 1e6:.1f} M parameters (hidden {s['hidden']}, {s['layers']} layers), "
             f"LoRA r={s['rank']} on {', '.join(s['targets'])}, {s['steps']} steps x {s['batch_size']} examples "
             f"per adapter, max_seq_len {s['max_seq_len']}, {s['threads']} torch thread(s), "
             f"median of {s['repeats']} repeats."), "",
             ("| K | sequential samples/s | batched samples/s | speedup (min-max over repeats) | peak RSS sequential | "
             "peak RSS batched | max weight diff | >= 1.2x |"), "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['sequential_samples_per_second']:.2f} | {r['batched_samples_per_second']:.2f} | "
                     f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                     f"{r['sequential_peak_rss_mib']:.0f} MiB | {r['batched_peak_rss_mib']:.0f} MiB | "
                     f"{r['max_weight_diff']:.1e} | {'met' if r['goal_met'] else 'not met'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "batched_adapters.json"))
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="adapter counts to compare")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=8, help="examples per adapter per step")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    # Internal: one run in a child process.
    p.add_argument("--worker", choices=["sequential", "batched"], help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--base-dir", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--state-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
