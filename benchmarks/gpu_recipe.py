"""Peak GPU memory and tokens/s of one federated round per training recipe, on a 1B-class Llama.

Needs CUDA: without it, the script says so and exits with status 2. Everything else is made here: a
randomly initialised Llama of ~1.1 B parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 heads
with 4 KV heads, intermediate 5632; the tiny preset's character tokenizer, vocab padded to 32,000),
saved in bf16, and a real coordinator with one real client agent (a thread of this process, real
gRPC on loopback) that trains one round of rank-16 LoRA on every attention and MLP projection per
recipe. The client points ``--base-dir`` at the model, so the round moves no base bytes.

Recipes: ``fp32``; ``bf16`` (base in bf16, autocast); ``bf16 ckpt`` (plus gradient checkpointing);
``nf4 ckpt`` (the client loads the base in nf4 itself, ``client_quantization: allowed``, with
gradient checkpointing). Peak memory is ``torch.cuda.max_memory_allocated`` over the round, reset
before each; tokens/s counts the training tokens over the agent's training time.

    python benchmarks/gpu_recipe.py --out benchmarks/out/gpu_recipe     # under 5 minutes on one GPU

Writes ``OUT/gpu_recipe.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 ckpt": {"precision": "bf16", "gradient_checkpointing": True},
    "nf4 ckpt": {"precision": "bf16", "gradient_checkpointing": True, "quantize": "nf4"},
}
TARGETS = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu_recipe")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--device", default="cuda:0")
    return p.parse_args(argv)


def build_base(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.models import TINY_PRESET, materialize_preset

    with tempfile.TemporaryDirectory() as tmp:
        materialize_preset(TINY_PRESET, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=max(2048, args.max_seq_len), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return {"params": params, "layers": args.layers, "hidden": args.hidden,
            "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file())}


def write_data(path: Path, n: int, length: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            text = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(length))
            f.write(json.dumps({"text": text[:length]}) + "\n")
    return path


def run_recipe(name: str, args: argparse.Namespace, base: Path, data: Path, work: Path) -> dict[str, Any]:
    import torch

    from fedtune.client.agent import ClientAgent
    from fedtune.client.channel import INSECURE
    from fedtune.coordinator.server import start

    settings = RECIPES[name]
    results: list[Any] = []

    class Measured(ClientAgent):
        def _train(self, prepared, global_state, task):  # type: ignore[no-untyped-def]
            out = super()._train(prepared, global_state, task)
            results.append(out[0])
            return out

    spec = (f"name: {name.replace(' ', '-')}\nbase_model: {base}\n"
            f"client_quantization: {'allowed' if settings.get('quantize') else 'null'}\n"
            f"peft: {{r: 16, alpha: 32, target_modules: {TARGETS}}}\n"
            f"training: {{steps: {args.steps}, batch_size: {args.batch}, max_seq_len: {args.max_seq_len}, lr: 0.0002, "
            f"precision: {settings['precision']}, gradient_checkpointing: {str(settings.get('gradient_checkpointing', False)).lower()}}}\n"
            "rounds: 1\nclients_per_round: 1\nmin_clients: 1\n")
    running = start(work / f"coord-{name.replace(' ', '-')}", "127.0.0.1", 0, insecure=True)
    try:
        svc = running.coordinator
        job = svc.create_job(spec).job_id
        token = svc.state.add_token(job, 1, 3600)[0]
        agent = Measured(running.address, token, data, work / f"client-{name.replace(' ', '-')}", INSECURE,
                         device=args.device, name="gpu", progress=False, quantize=settings.get("quantize"),
                         base_dir=base)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                agent.run()
            except BaseException as e:  # noqa: BLE001 - reported in the table
                errors.append(e)

        t0 = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=600)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        if errors or not results:
            return {"recipe": name, "error": str(errors[0]) if errors else "no round trained"}
        result = results[-1]
        tokens = args.steps * args.batch * args.max_seq_len
        return {"recipe": name, **settings, "peak_gpu_gib": peak / 2**30, "train_seconds": result.seconds,
                "tokens_per_second": tokens / result.seconds, "round_wall_seconds": wall,
                "mean_loss": result.mean_loss, "bytes_down": agent.stats.bytes_down,
                "job_state": svc.state.job(job).state}
    finally:
        running.stop(grace=0.5)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # --device cpu: a smoke run of the script itself (tiny sizes), with no memory figures.
    if not torch.cuda.is_available() and args.device != "cpu":
        print("gpu_recipe.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "run benchmarks/recipes.py for the CPU counterpart", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtune-gpu-recipe-") as tmp:
        work = Path(tmp)
        info = build_base(args, work / "base")
        print(f"base: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / 2**30:.2f} GiB", file=sys.stderr)
        data = write_data(work / "data.jsonl", args.batch * args.steps, args.max_seq_len)
        for name in [r for r in args.recipes.split(",") if r]:
            rows.append(run_recipe(name, args, work / "base", data, work))
            print(f"  {rows[-1]}", file=sys.stderr)
    out = {"date": datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "torch": torch.__version__, "model": info, "steps": args.steps,
           "batch": args.batch, "max_seq_len": args.max_seq_len, "recipes": rows, "seconds": time.time() - started}
    (args.out / "gpu_recipe.json").write_text(json.dumps(out, indent=2))
    print("| recipe | peak GPU GiB | tokens/s | train s | bytes down |\n|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | error: {r['error']} ||||")
        else:
            print(f"| {r['recipe']} | {r['peak_gpu_gib']:.2f} | {r['tokens_per_second']:.0f} | "
                  f"{r['train_seconds']:.1f} | {r['bytes_down']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
