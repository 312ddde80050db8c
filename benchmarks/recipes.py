"""Client memory and speed per training recipe on CPU, and base bytes down for a client that has the base.

Part 1 trains rank-8 LoRA on a randomly initialised ~100 M parameter Llama (the one
``round_overhead.py`` builds) with ``fedtune.training.train_adapter`` under each recipe, each in a
fresh process so its peak resident memory is its own:

- ``fp32``: the baseline, the whole batch in one pass;
- ``fp32 micro 2``: the same batch as 4 accumulated micro-batches of 2;
- ``fp32 ckpt``: gradient checkpointing;
- ``bf16``: the base stored in bf16, the forward under bf16 autocast (LoRA weights fp32);
- ``bf16 ckpt``: both;
- ``nf4 ckpt``: the base in bitsandbytes nf4 (QLoRA on bitsandbytes' CPU backend) with checkpointing.

Peak memory is the process's peak RSS (``VmHWM``) from the end of loading on: the peak is reset once
the model is loaded (``/proc/self/clear_refs``), so what loading touches does not count; the
loaded model's RSS is reported beside it. Seconds per step are timed after one warm-up step.

Part 2 runs a real coordinator and two real client agents (threads of this process, real gRPC on
loopback) for one round of a job on the same base: one client fetches the base, the other points
``--base-dir`` at its own copy. It reports each client's bytes down.

    .venv/bin/python benchmarks/recipes.py --out benchmarks/out/recipes

Prints markdown tables and writes ``OUT/recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "fp32 micro 2": {"precision": "fp32", "micro_batch": 2},
    "fp32 ckpt": {"precision": "fp32", "gradient_checkpointing": True},
    "bf16": {"precision": "bf16"},
    "bf16 ckpt": {"precision": "bf16", "gradient_checkpointing": True},
    "nf4 ckpt": {"precision": "fp32", "gradient_checkpointing": True, "quantize": "nf4"},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "recipes")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per recipe (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    # The ~100 M Llama of round_overhead.py.
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--skip-bytes", action="store_true", help="skip part 2")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def texts(n: int, length: int, seed: int = 0) -> list[str]:
    """Lines of random words that fill ``length`` characters (the char tokenizer: ~1 token each)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < length:
            words.append("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))))
        out.append(" ".join(words)[:length])
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One recipe, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    from fedtune.data import Example, tokenize
    from fedtune.methods import config_for
    from fedtune.models import load_causal_lm, load_tokenizer
    from fedtune.peft_io import build_peft_model
    from fedtune.training import Recipe, precision_dtype, train_adapter

    settings = RECIPES[args.child]
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    if settings.get("quantize"):
        from fedtune.quantization import load_quantized_causal_lm

        base = load_quantized_causal_lm(args.model_dir, cpu, settings["quantize"])
    else:
        base = load_causal_lm(args.model_dir, cpu, precision_dtype(settings["precision"]))
    model = build_peft_model(base, config=config_for({"method": "lora", "r": 8, "alpha": 16, "target_modules": TARGETS}))
    tokenizer = load_tokenizer(args.model_dir)
    items = tokenize([Example("", t) for t in texts(args.batch * (args.steps + 1), args.max_seq_len)], tokenizer,
                     args.max_seq_len)
    load_seconds = time.perf_counter() - t0
    recipe = Recipe(micro_batch=settings.get("micro_batch"), precision=settings["precision"],
                    gradient_checkpointing=bool(settings.get("gradient_checkpointing")))
    common = {"pad_id": tokenizer.pad_token_id, "lr": 1e-3, "batch_size": args.batch, "epochs": None, "seed": 0,
              "device": cpu, "progress": False, "recipe": recipe}
    loaded_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    train_adapter(model, items[:args.batch], steps=1, **common)  # warm-up: first-call costs, not timed
    t1 = time.perf_counter()
    result = train_adapter(model, items[args.batch:], steps=args.steps, **common)
    seconds = time.perf_counter() - t1
    peak_kib = _status_kib("VmHWM")
    tokens = sum(len(i["input_ids"]) for i in items[args.batch:][:args.batch * args.steps])
    return {"recipe": args.child, **settings, "load_seconds": load_seconds, "rss_loaded_mib": loaded_kib / 1024,
            "peak_rss_mib": peak_kib / 1024, "training_extra_mib": (peak_kib - loaded_kib) / 1024,
            "seconds_per_step": seconds / args.steps, "tokens_per_second": tokens / seconds,
            "mean_loss": result.mean_loss}


def run_recipes(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for name in [r for r in args.recipes.split(",") if r]:
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--steps", str(args.steps),
               "--batch", str(args.batch), "--max-seq-len", str(args.max_seq_len), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            rows.append({"recipe": name, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    return rows


def run_bytes(model_dir: Path, work: Path) -> dict[str, Any]:
    """One round, two clients: one fetches the base, one has its own copy (``--base-dir``)."""
    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE
    from fedtune.coordinator.server import start
    from fedtune.data import write_synthetic_federation
    from fedtune.hashing import loadable_files

    files, _ = write_synthetic_federation(work / "data", 2, examples_per_client=16)
    own = work / "own-base"
    shutil.copytree(model_dir, own)
    (own / "pytorch_model.bin").write_bytes(b"\0" * (1 << 20))  # a duplicate a hub snapshot may hold
    running = start(work / "coord", "127.0.0.1", 0, insecure=True)
    try:
        svc = running.coordinator
        job = svc.create_job(f"name: bytes\nbase_model: {model_dir}\npeft: {{r: 8, alpha: 16}}\n"
                             "training: {steps: 1, batch_size: 4, max_seq_len: 32}\nrounds: 1\n"
                             "clients_per_round: 2\nmin_clients: 2\n").job_id
        tokens = [svc.state.add_token(job, 1, 3600)[0] for _ in range(2)]
        agents = [ClientAgent(running.address, tokens[0], files[0], work / "c-fetch", INSECURE, device="cpu",
                              name="fetch", progress=False),
                  ClientAgent(running.address, tokens[1], files[1], work / "c-own", INSECURE, device="cpu",
                              name="own", progress=False, base_dir=own)]
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        base_bytes = sum(p.stat().st_size for p in loadable_files(model_dir))
        adapter = svc.state.rounds(job)[0]
        return {"base_bytes": base_bytes, "snapshot_bytes": sum(p.stat().st_size for p in own.iterdir()),
                "fetch_client_bytes_down": agents[0].stats.bytes_down,
                "own_base_client_bytes_down": agents[1].stats.bytes_down,
                "job_state": svc.state.job(job).state, "round": adapter.round}
    finally:
        running.stop(grace=0.5)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    from round_overhead import build_model
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedtune-recipes-") as tmp:
        work = Path(tmp)
        model_dir = work / "base"
        args.max_seq_len = max(args.max_seq_len, 32)
        info = build_model(args, model_dir)
        rows = run_recipes(args, model_dir)
        transfer = None if args.skip_bytes else run_bytes(model_dir, work)
    import torch

    out = {"date": datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "model": info, "batch": args.batch,
           "max_seq_len": args.max_seq_len, "steps": args.steps, "threads": args.threads, "recipes": rows,
           "bytes": transfer, "seconds": time.time() - started}
    (args.out / "recipes.json").write_text(json.dumps(out, indent=2))
    base = next((r for r in rows if r["recipe"] == "fp32" and "error" not in r), None)
    print("| recipe | loaded RSS MiB | peak RSS in training MiB | training extra MiB | s/step | tokens/s | "
          "vs fp32 s/step |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | error: {r['error']} |||||")
            continue
        ratio = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "-"
        print(f"| {r['recipe']} | {r['rss_loaded_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['training_extra_mib']:.0f} "
              f"| {r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | {ratio} |")
    if transfer:
        print(f"\nbase {transfer['base_bytes']:,} bytes (snapshot with a .bin duplicate: "
              f"{transfer['snapshot_bytes']:,}); bytes down: fetching client {transfer['fetch_client_bytes_down']:,}, "
              f"client with --base-dir {transfer['own_base_client_bytes_down']:,} ({transfer['job_state']})")


if __name__ == "__main__":
    main()
