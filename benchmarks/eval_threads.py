"""Evaluation threads of the compute actor: one thread (what Ray gave it) vs the jobs' CPU quota.

The compute actor reserves no CPU, so Ray starts it with ``OMP_NUM_THREADS=1`` and, before
2026-12-01, every job's evaluation ran on one torch thread whatever CPU quota the jobs held. Now
the scheduler sets its threads to the running jobs' summed quota. This times what the actor runs,
:class:`fedtune.cluster.shared_compute.EvalBatcher` (two jobs' LoRA adapters evaluated in one
batched pass, then one job alone), on the same base and data with ``--threads`` 1 and N, the
sides alternating over ``--repeats`` (medians reported), in one process.

    python benchmarks/eval_threads.py --out benchmarks/out/eval_threads.json

The base is the random Llama of ``batched_adapters.py`` (default hidden 512, 8 layers: ~27 M).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from benchmarks.batched_adapters import build_base
from fedtune.cluster.shared_compute import EvalBatcher
from fedtune.coordinator.evaluator import Evaluator
from fedtune.coordinator.state import Job
from fedtune.data import write_synthetic_federation
from fedtune.models import load_causal_lm
from fedtune.peft_io import adapter_state, build_peft_model
from fedtune.spec import parse_spec

CPU = torch.device("cpu")


def _job(job_id: str, eval_file: Path, base: Path, targets: list[str], batch_size: int, max_seq_len: int) -> Job:
    spec = parse_spec(f"name: {job_id}\nbase_model: {json.dumps(str(base))}\n"
                      f"peft: {{r: 8, alpha: 16, target_modules: [{', '.join(targets)}]}}\n"
                      f"training: {{batch_size: {batch_size}, max_seq_len: {max_seq_len}}}\n"
                      f"eval_data: {json.dumps(str(eval_file))}\n")
    return Job(job_id, job_id, spec.model_dump_json(), "running", 1, str(base), "h", "", "{}", None, "", 0.0)


def _adapter(base: Path, seed: int, targets: list[str]) -> dict[str, torch.Tensor]:
    model = build_peft_model(load_causal_lm(base, CPU), seed=seed, dropout=0.0, r=8, alpha=16, target_modules=targets)
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.02 for k, v in adapter_state(model).items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.out).parent / "eval_threads"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_base(out_dir, args.hidden, args.layers)
    _, eval_file = write_synthetic_federation(out_dir / "data", 1, examples_per_client=8,
                                              eval_examples=args.eval_examples)
    jobs = [_job("job-a", eval_file, base, ["q_proj", "v_proj"], 8, args.max_seq_len),
            _job("job-b", eval_file, base, ["gate_proj", "up_proj", "down_proj"], 8, args.max_seq_len)]
    adapters = [_adapter(base, 0, ["q_proj", "v_proj"]), _adapter(base, 1, ["gate_proj", "up_proj", "down_proj"])]
    batcher = EvalBatcher(Evaluator(lambda _job: base, CPU), base, load_causal_lm, CPU)
    sides = sorted({1, args.threads})
    batcher.threads = sides[0]
    batcher.evaluate_many(list(zip(jobs, adapters, strict=True)))  # warm: models built, data tokenized
    batcher.evaluate(jobs[0], adapters[0])
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for threads in (sides if rep % 2 == 0 else sides[::-1]):
            batcher.threads = threads
            t0 = time.perf_counter()
            losses = batcher.evaluate_many(list(zip(jobs, adapters, strict=True)))
            t1 = time.perf_counter()
            batcher.evaluate(jobs[0], adapters[0])
            t2 = time.perf_counter()
            runs.append({"repeat": rep, "threads": threads, "pass_threads": batcher.pass_threads[-1],
                         "two_jobs_batched_seconds": t1 - t0, "one_job_seconds": t2 - t1,
                         "losses": [x["eval_loss"] for x in losses]})
            print(f"rep {rep} threads {threads}: two jobs batched {t1 - t0:.2f}s, one job {t2 - t1:.2f}s",
                  file=sys.stderr)
    rows = []
    for threads in sides:
        mine = [r for r in runs if r["threads"] == threads]
        rows.append({"threads": threads,
                     "two_jobs_batched_seconds": statistics.median(r["two_jobs_batched_seconds"] for r in mine),
                     "one_job_seconds": statistics.median(r["one_job_seconds"] for r in mine)})
    spread = max(abs(a - b) for r in runs for a, b in zip(r["losses"], runs[0]["losses"], strict=True))
    n_params = sum(p.numel() for p in load_causal_lm(base, CPU).parameters())
    result = {"date": datetime.now().isoformat(timespec="seconds"),
              "settings": {"hidden": args.hidden, "layers": args.layers, "base_parameters": n_params,
                           "eval_examples": args.eval_examples, "max_seq_len": args.max_seq_len,
                           "repeats": args.repeats},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
              "rows": rows, "max_loss_difference_between_sides": spread, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    one = rows[0]
    print(f"Base {n_params / 1e6:.1f} M, {args.eval_examples} eval examples x {args.max_seq_len} tokens, "
          f"median of {args.repeats}; losses equal across sides within {spread:.1e}.\n")
    print("| torch threads | two jobs, one batched pass | one job | speed-up vs 1 thread |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['two_jobs_batched_seconds']:.2f} s | {r['one_job_seconds']:.2f} s | "
              f"{one['two_jobs_batched_seconds'] / r['two_jobs_batched_seconds']:.2f}x / "
              f"{one['one_job_seconds'] / r['one_job_seconds']:.2f}x |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "eval_threads.json"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the quota side's threads")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
