"""Serving many adapters (issue 15): fedtune's batched engine vs plain peft switching adapters per request.

64 concurrent requests (all submitted at once), spread round-robin over 1, 4, 16 or 64 distinct
LoRA adapters (rank 8 on ``q_proj`` and ``v_proj``, random non-zero weights), each a prompt of 16 to
48 characters, greedy, ``--max-tokens`` tokens. *fedtune* is `fedtune.serving.engine.GenerationEngine`
(one base, each forward pass shared by all running rows, each row through its own adapter, KV
cache, continuous batching; ``--max-batch`` rows). *peft* is what users write by hand: one
`PeftModel` holding every adapter, requests served one at a time in arrival order, ``set_adapter``
then ``generate``. Throughput is generated tokens per second from the first submit to the last
token, of wall time and of the process's CPU time (the second is what to compare on a machine that
other work loads: it counts only this process's own work); time to first token (TTFT) is measured
from the common submit time, so queueing counts (a peft request waits for those before it; the
engine's decode loop starts once all 64 are queued, as when they arrive together). Adapter loading
is excluded on both sides. The base is a randomly initialised Llama (default hidden 512, 8 layers,
MLP 1536, 8 heads, the tiny preset's 100-token character vocabulary), which is fine for speed; the
two sides' token ids are compared (greedy, fp32: they must be equal). The engine runs
``--engine-repeats`` rounds over all adapter counts (it is cheap to repeat; figures are medians) and
peft runs once per count in the middle round, so drift in the machine's load hits all alike.

*serve* (on unless ``--no-through-http``) is the same through the HTTP API: the adapters are published
into a temporary coordinator state dir as the round engine publishes them (signed with its key,
recorded in its SQLite state, as rounds 1..N of one job), a real ``fedtune serve --state-dir DIR
--port 0`` process serves them, each adapter is requested once before any timing (verified and
loaded), then 64 streamed completions start at once from 64 threads with the official ``openai``
client (prompts as token ids, request i for round i mod N + 1), in every round beside the engine.
Throughput counts the completion tokens the server reports per wall second and per CPU second of
the server process; TTFT is the first streamed chunk; each reply's text is compared with peft's
tokens for the same request, decoded.

    .venv/bin/python benchmarks/serving.py --out benchmarks/out/serving.json

Prints markdown tables and writes every figure, the machine and the settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.generation.streamers import BaseStreamer

from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.serving.engine import GenerationEngine, SamplingParams

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 8, 16
REQUESTS = 64
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his",
         "an", "were", "are", "which", "this", "be"]


def build_base(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the tiny preset's tokenizer, saved as an ordinary model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = out / f"base-h{hidden}-l{layers}"
    if (base / "model.safetensors").exists():
        return base
    tokenizer = load_tokenizer(materialize_preset(TINY_PRESET, out / "preset"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    return base


def build_adapters(base: Path, out: Path, n: int) -> list[Path]:
    """n LoRA adapter directories with random non-zero weights (peft starts B at zero)."""
    dirs = [out / f"adapter-{k:02d}" for k in range(n)]
    missing = [k for k, d in enumerate(dirs) if not (d / "adapter_model.safetensors").exists()]
    if missing:
        model = get_peft_model(load_causal_lm(base, CPU), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
        for k in missing:
            torch.manual_seed(k)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.02 if "lora_A" in name else 0.2)
            model.save_pretrained(str(dirs[k]))
    return dirs


def prompts(tokenizer: Any) -> list[list[int]]:
    """REQUESTS prompts of 16 to 48 characters."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(REQUESTS):
        target = 16 + (i * 7) % 33
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=gen))])
        out.append(tokenizer(" ".join(words)[:target])["input_ids"])
    return out


def run_engine(base: Path, tokenizer: Any, dirs: list[Path], batch: list[list[int]], args: argparse.Namespace
               ) -> dict[str, Any]:
    engine = GenerationEngine(load_causal_lm(base, CPU), tokenizer, max_batch=args.max_batch, max_queue=REQUESTS)
    for k, d in enumerate(dirs):
        engine.add_adapter(f"a{k}", d)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    first: list[float] = [0.0] * len(batch)
    outputs: list[list[int]] = [[] for _ in batch]
    try:
        start, cpu = time.perf_counter(), time.process_time()
        streams = [engine.submit(p, f"a{i % len(dirs)}", params) for i, p in enumerate(batch)]
        engine.start()

        def drain(i: int) -> None:
            for event in streams[i]:
                if not outputs[i]:
                    first[i] = time.perf_counter() - start
                outputs[i].extend(event.token_ids)

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        sizes = engine.stats["batch_sizes"]
    finally:
        engine.stop()
    steps = {size: count for size, count in sizes.items()}
    return _figures("fedtune", len(dirs), outputs, first, seconds, cpu) | {"batch_sizes": steps}


class _FirstToken(BaseStreamer):
    """Records when generate hands out its first new token (its first put is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def run_peft(base: Path, dirs: list[Path], batch: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    model = PeftModel.from_pretrained(load_causal_lm(base, CPU), dirs[0], adapter_name="a0")
    for k, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{k}")
    model.eval()
    first: list[float] = []
    outputs = []
    with torch.inference_mode():
        start, cpu = time.perf_counter(), time.process_time()
        for i, prompt in enumerate(batch):
            model.set_adapter(f"a{i % len(dirs)}")
            streamer = _FirstToken()
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 do_sample=False, streamer=streamer)
            assert streamer.at is not None
            first.append(streamer.at - start)
            outputs.append(out[0, len(prompt):].tolist())
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _figures("peft", len(dirs), outputs, first, seconds, cpu)



class Served:
    """The N adapters published into a temporary coordinator state dir and a real `fedtune serve` on it.

    One job, round k+1 holding adapter k's weights (published as the coordinator's round engine
    does: signed with the state dir's key, recorded with ``publish_round``); the server runs in a
    process of its own with ``--max-adapters`` and ``--max-concurrent`` at the largest count, so
    no adapter is evicted and no request refused.
    """

    def __init__(self, base: Path, dirs: list[Path], args: argparse.Namespace, stack: ExitStack) -> None:
        from safetensors.torch import load_file

        from tests.publishing import Publisher

        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedtune-serving-")))
        pub = Publisher(state_dir)
        stack.callback(pub.state.close)
        job = pub.job(base, "bench")
        for k, d in enumerate(dirs):
            pub.publish_tensors(job, k + 1, load_file(d / "adapter_model.safetensors"))
        self.models = [f"{job}@{k + 1}" for k in range(len(dirs))]
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.log = Path(args.out).parent / "serving" / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "serve", "--state-dir", str(state_dir), "--port", "0",
             "--max-adapters", str(len(dirs)), "--max-concurrent", str(REQUESTS), "--max-batch", str(args.max_batch)],
            stdout=subprocess.PIPE, stderr=self.log.open("wb"), env=env, cwd=REPO, text=True)
        stack.callback(self.stop)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("http://"):
            raise SystemExit(f"fedtune serve did not start:\n{self.log.read_text()[-3000:]}")
        import openai

        self.client = openai.OpenAI(base_url=f"{line.strip()}/v1", api_key="none", max_retries=0, timeout=600)
        for model in self.models:  # each adapter verified and loaded once, outside the timings
            self.client.completions.create(model=model, prompt="warm up", max_tokens=1, temperature=0)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_http(served: Served, n: int, batch: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """64 streamed completions at once over HTTP, request i for adapter i mod n, each on its own thread."""
    errors: list[BaseException] = []
    texts = [""] * len(batch)
    tokens = [0] * len(batch)
    first = [0.0] * len(batch)
    gate = threading.Barrier(len(batch) + 1)
    start = 0.0

    def request(i: int) -> None:
        gate.wait()
        try:
            chunks = served.client.completions.create(
                model=served.models[i % n], prompt=batch[i], max_tokens=args.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            for chunk in chunks:  # time to first token: the first chunk that carries a choice
                if chunk.choices and not first[i]:
                    first[i] = time.perf_counter() - start
                texts[i] += "".join(c.text for c in chunk.choices)
                if chunk.usage is not None:
                    tokens[i] = chunk.usage.completion_tokens
        except BaseException as e:  # noqa: BLE001 - raised on the main thread below
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    cpu, client_cpu = served.cpu_seconds(), time.process_time()
    start = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - start, served.cpu_seconds() - cpu
    client_cpu = time.process_time() - client_cpu
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(batch)} requests failed (see {served.log})") from errors[0]
    ttft = sorted(first)
    total = sum(tokens)
    return {"mode": "http", "adapters": n, "tokens": total, "seconds": seconds, "tokens_per_second": total / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_second": total / cpu, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "client_cpu_seconds": client_cpu,
            "texts": texts}


def _figures(mode: str, n: int, outputs: list[list[int]], first: list[float], seconds: float,
             cpu: float) -> dict[str, Any]:
    tokens = sum(len(o) for o in outputs)
    ttft = sorted(first)
    return {"mode": mode, "adapters": n, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_second": tokens / cpu,
            "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "outputs": outputs}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out).parent / "serving"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_base(out_dir, args.hidden, args.layers)
    tokenizer = load_tokenizer(base)
    dirs = build_adapters(base, out_dir, max(args.adapters))
    batch = prompts(tokenizer)
    n_params = sum(p.numel() for p in load_causal_lm(base, CPU).parameters())
    started = time.time()
    runs: list[dict[str, Any]] = []
    # Rounds over every adapter count, peft in the middle one: drift in the machine's load then
    # hits every count and all sides alike.
    http = ["http"] if args.through_http else []
    plan = [(rep, n, mode) for rep in range(args.engine_repeats) for n in args.adapters
            for mode in (["fedtune", "peft"] if rep == args.engine_repeats // 2 else ["fedtune"]) + http]
    with ExitStack() as stack:
        served = Served(base, dirs, args, stack) if http else None
        for rep, n, mode in plan:
            if mode == "peft":
                run = run_peft(base, dirs[:n], batch, args)
            elif mode == "http":
                assert served is not None
                run = run_http(served, n, batch, args)
            else:
                run = run_engine(base, tokenizer, dirs[:n], batch, args)
            run["repeat"] = rep
            runs.append(run)
            print(f"round {rep} adapters={n:2d} {mode:7s} {run['tokens_per_second']:8.1f} tok/s "
                  f"({run['tokens_per_cpu_second']:.1f} per CPU-s) TTFT p50 {run['ttft_p50']:.2f}s "
                  f"p99 {run['ttft_p99']:.2f}s ({run['seconds']:.1f}s)", file=sys.stderr)
    rows = []
    for n in args.adapters:
        ours = [r for r in runs if r["adapters"] == n and r["mode"] == "fedtune"]
        theirs = [r for r in runs if r["adapters"] == n and r["mode"] == "peft"]
        row: dict[str, Any] = {"adapters": n}
        for name, group in (("fedtune", ours), ("peft", theirs)):
            for key in ("tokens_per_second", "tokens_per_cpu_second", "ttft_p50", "ttft_p99"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in group)
        row["speedup"] = row["fedtune_tokens_per_second"] / row["peft_tokens_per_second"]
        row["cpu_speedup"] = row["fedtune_tokens_per_cpu_second"] / row["peft_tokens_per_cpu_second"]
        # Greedy fp32 on both sides: every request's tokens must be the same.
        row["same_tokens"] = sum(a == b for r1 in ours for a, b in zip(r1["outputs"], theirs[0]["outputs"],
                                                                       strict=True))
        row["requests_compared"] = REQUESTS * len(ours)
        served_runs = [r for r in runs if r["adapters"] == n and r["mode"] == "http"]
        if served_runs:
            for key in ("tokens_per_second", "tokens_per_cpu_second", "ttft_p50", "ttft_p99"):
                row[f"http_{key}"] = statistics.median(r[key] for r in served_runs)
            row["http_speedup"] = row["http_tokens_per_second"] / row["peft_tokens_per_second"]
            row["http_cpu_speedup"] = row["http_tokens_per_cpu_second"] / row["peft_tokens_per_cpu_second"]
            # The served text, greedy, against peft's tokens decoded as the server decodes them.
            peft_texts = [tokenizer.decode(o, skip_special_tokens=True) for o in theirs[0]["outputs"]]
            row["http_same_text"] = sum(a == b for r1 in served_runs for a, b in zip(r1["texts"], peft_texts,
                                                                                    strict=True))
            row["http_requests_compared"] = REQUESTS * len(served_runs)
        rows.append(row)
    one = next((r for r in rows if r["adapters"] == 1), None)
    for row in rows:
        row["vs_one_adapter"] = row["fedtune_tokens_per_second"] / one["fedtune_tokens_per_second"] if one else None
        row["cpu_vs_one_adapter"] = (row["fedtune_tokens_per_cpu_second"] / one["fedtune_tokens_per_cpu_second"]
                                     if one else None)
        if "http_tokens_per_second" in row:
            row["http_vs_one_adapter"] = row["http_tokens_per_second"] / one["http_tokens_per_second"] if one else None
            row["http_cpu_vs_one_adapter"] = (row["http_tokens_per_cpu_second"] / one["http_tokens_per_cpu_second"]
                                              if one else None)
    for run in runs:
        run.pop("outputs", None)
        run.pop("texts", None)
    result = {
        "date": datetime.now().isoformat(timespec="seconds"), "seconds": time.time() - started,
        "settings": {"hidden": args.hidden, "layers": args.layers, "base_parameters": n_params, "rank": RANK,
                     "targets": TARGETS, "requests": REQUESTS, "max_tokens": args.max_tokens,
                     "max_batch": args.max_batch, "engine_repeats": args.engine_repeats, "threads": args.threads,
                     "through_http": args.through_http},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "goals": {"speedup_at_16": next((r["speedup"] for r in rows if r["adapters"] == 16), None),
                  "64_vs_1": next((r["vs_one_adapter"] for r in rows if r["adapters"] == 64), None),
                  "cpu_speedup_at_16": next((r["cpu_speedup"] for r in rows if r["adapters"] == 16), None),
                  "cpu_64_vs_1": next((r["cpu_vs_one_adapter"] for r in rows if r["adapters"] == 64), None),
                  "http_speedup_at_16": next((r.get("http_speedup") for r in rows if r["adapters"] == 16), None),
                  "http_64_vs_1": next((r.get("http_vs_one_adapter") for r in rows if r["adapters"] == 64), None),
                  "http_cpu_speedup_at_16": next((r.get("http_cpu_speedup") for r in rows if r["adapters"] == 16),
                                                 None),
                  "http_cpu_64_vs_1": next((r.get("http_cpu_vs_one_adapter") for r in rows if r["adapters"] == 64),
                                           None)},
        "rows": rows, "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(_md(result))


def _md(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [(f"Base {s['base_parameters'] / 1e6:.1f} M parameters (random Llama, hidden {s['hidden']}, "
              f"{s['layers']} layers), LoRA r={s['rank']} on {', '.join(s['targets'])}, {s['requests']} requests "
              f"submitted at once, {s['max_tokens']} greedy tokens each, max batch {s['max_batch']}, "
              f"{s['threads']} torch thread(s), engine figures the median of {s['engine_repeats']} runs; "
              "load average at the end "
              f"{result['machine']['load_average'][0]:.1f}."), "",
             ("| distinct adapters | fedtune tok/s | peft tok/s | speedup | fedtune tok/CPU-s | peft tok/CPU-s | "
              "speedup (CPU) | fedtune TTFT p50 / p99 | peft TTFT p50 / p99 | fedtune vs 1 adapter (wall / CPU) | "
              "same tokens |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        vs = (f"{r['vs_one_adapter']:.2f} / {r['cpu_vs_one_adapter']:.2f}" if r["vs_one_adapter"] is not None
              else "-")
        lines.append(f"| {r['adapters']} | {r['fedtune_tokens_per_second']:.0f} | {r['peft_tokens_per_second']:.0f} | "
                     f"{r['speedup']:.1f}x | {r['fedtune_tokens_per_cpu_second']:.0f} | "
                     f"{r['peft_tokens_per_cpu_second']:.0f} | {r['cpu_speedup']:.1f}x | "
                     f"{r['fedtune_ttft_p50']:.2f} s / {r['fedtune_ttft_p99']:.2f} s | "
                     f"{r['peft_ttft_p50']:.2f} s / {r['peft_ttft_p99']:.2f} s | {vs} | "
                     f"{r['same_tokens']}/{r['requests_compared']} |")
    g = result["goals"]
    if g["speedup_at_16"] is not None:
        lines.append(f"\nGoal >= 4x peft at 16 adapters: {g['speedup_at_16']:.1f}x wall, {g['cpu_speedup_at_16']:.1f}x CPU "
                     f"({'met' if min(g['speedup_at_16'], g['cpu_speedup_at_16']) >= 4 else 'not met'}).")
    if g["64_vs_1"] is not None:
        lines.append(f"Goal 64 adapters within 20% of 1: {g['64_vs_1']:.2f} wall, {g['cpu_64_vs_1']:.2f} CPU "
                     f"({'met' if min(g['64_vs_1'], g['cpu_64_vs_1']) >= 0.8 else 'not met'}).")
    if any("http_tokens_per_second" in r for r in result["rows"]):
        lines += ["", ("Through HTTP: a `fedtune serve` process (the same adapters published into a coordinator "
                       "state dir, each loaded once beforehand), 64 streamed requests at once from threads with "
                       "the `openai` client; CPU is the server process's; TTFT is the first streamed chunk."), "",
                  ("| distinct adapters | serve tok/s | peft tok/s | speedup | serve tok/CPU-s | speedup (CPU) | "
                   "serve TTFT p50 / p99 | peft TTFT p50 / p99 | serve vs 1 adapter (wall / CPU) | same text as peft |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            vs = (f"{r['http_vs_one_adapter']:.2f} / {r['http_cpu_vs_one_adapter']:.2f}"
                  if r.get("http_vs_one_adapter") is not None else "-")
            lines.append(f"| {r['adapters']} | {r['http_tokens_per_second']:.0f} | {r['peft_tokens_per_second']:.0f} | "
                         f"{r['http_speedup']:.1f}x | {r['http_tokens_per_cpu_second']:.0f} | "
                         f"{r['http_cpu_speedup']:.1f}x | "
                         f"{r['http_ttft_p50']:.2f} s / {r['http_ttft_p99']:.2f} s | "
                         f"{r['peft_ttft_p50']:.2f} s / {r['peft_ttft_p99']:.2f} s | {vs} | "
                         f"{r['http_same_text']}/{r['http_requests_compared']} |")
        if g["http_speedup_at_16"] is not None:
            ok = min(g["http_speedup_at_16"], g["http_cpu_speedup_at_16"]) >= 4
            lines.append(f"\nThrough HTTP, goal >= 4x peft at 16 adapters: {g['http_speedup_at_16']:.1f}x wall, "
                         f"{g['http_cpu_speedup_at_16']:.1f}x CPU ({'met' if ok else 'not met'}).")
        if g["http_64_vs_1"] is not None:
            ok = min(g["http_64_vs_1"], g["http_cpu_64_vs_1"]) >= 0.8
            lines.append(f"Through HTTP, goal 64 adapters within 20% of 1: {g['http_64_vs_1']:.2f} wall, "
                         f"{g['http_cpu_64_vs_1']:.2f} CPU ({'met' if ok else 'not met'}).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "serving.json"))
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64], help="distinct adapter counts")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--max-batch", type=int, default=64, help="rows in one batch of the engine")
    p.add_argument("--engine-repeats", type=int, default=3, help="engine runs per adapter count (peft runs once)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's too)")
    p.add_argument("--through-http", action=argparse.BooleanOptionalAction, default=True,
                   help="also serve the adapters with a real `fedtune serve` process and measure it over HTTP")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
