"""The serving engine against plain peft: batched multi-adapter greedy decoding is token for token
what `PeftModel.generate` gives each request alone (fp32, CPU, the tiny Llama preset)."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model

from fedtune.errors import InvalidInput, LimitExceeded, NotFound
from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.serving.engine import GenerationEngine, RequestStream, SamplingParams, TokenEvent

CPU = torch.device("cpu")
# Eight LoRA adapters of different ranks, scales and targets (the output layer included).
LORAS = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "o_proj", "down_proj"]},
    {"r": 2, "lora_alpha": 3, "target_modules": ["k_proj", "up_proj", "lm_head"]},
    {"r": 16, "lora_alpha": 16, "target_modules": ["gate_proj", "v_proj"]},
    {"r": 1, "lora_alpha": 4, "target_modules": ["o_proj"]},
    {"r": 6, "lora_alpha": 12, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"r": 3, "lora_alpha": 9, "target_modules": ["up_proj", "down_proj"], "use_rslora": True},
    {"r": 5, "lora_alpha": 5, "target_modules": ["q_proj"], "layers_to_transform": [1]},
]
PROMPTS = ["Hello world", "The quick brown fox jumps over", "a", "Federated learning is", "Once upon a time, ",
           "xyz", "Serving many adapters over one frozen base model", "42"]
MAX_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(preset dir, tokenizer, LoRA adapter dirs, an IA3 adapter dir), weights random and non-zero."""
    out = tmp_path_factory.mktemp("serving")
    preset = materialize_preset(TINY_PRESET, out / "preset")
    dirs = []
    for k, config in enumerate([*LORAS, None]):
        peft_config = LoraConfig(**config) if config else IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"])
        torch.manual_seed(k)
        model = get_peft_model(load_causal_lm(preset, CPU), peft_config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                    p.normal_(0, 0.3)
                elif "ia3_l" in name:
                    p.uniform_(0.2, 2.0)
        model.save_pretrained(out / f"adapter{k}")
        dirs.append(out / f"adapter{k}")
    return preset, load_tokenizer(preset), dirs[:-1], dirs[-1]


@functools.cache
def _reference(preset: Path, tokenizer, adapter_dir: Path | None, prompt: str,  # type: ignore[no-untyped-def]
               max_new_tokens: int = MAX_TOKENS) -> list[int]:
    """Plain peft greedy generation of one request alone (cached: several tests ask for the same)."""
    base = load_causal_lm(preset, CPU)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return list(out[0, inputs["input_ids"].shape[1]:].tolist())


def _engine(setup, n_adapters: int = 0, **kwargs) -> GenerationEngine:  # type: ignore[no-untyped-def]
    preset, tokenizer, loras, _ = setup
    engine = GenerationEngine(load_causal_lm(preset, CPU), tokenizer, **kwargs)
    for k in range(n_adapters):
        engine.add_adapter(f"job@{k}", loras[k])
    return engine


def _collect(stream: RequestStream) -> tuple[list[int], str, str | None]:
    events = list(stream)
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason


def _greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:  # type: ignore[no-untyped-def]
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def _run_greedy(engine: GenerationEngine, tokenizer, jobs) -> tuple[list[list[int]], dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Starts the engine, submits every (prompt, adapter) greedily at once and collects each one's
    tokens; returns them with the engine's stats, the engine stopped."""
    engine.start()
    try:
        streams = [engine.submit(tokenizer(p)["input_ids"], a, _greedy()) for p, a in jobs]
        got = [_collect(s)[0] for s in streams]
        stats = engine.stats
    finally:
        engine.stop()
    return got, stats


def test_mixed_batch_equals_plain_peft_token_for_token(setup) -> None:  # type: ignore[no-untyped-def]
    """8 adapters and the base in flight at once, prompts of different lengths, half of them joining
    a batch that is already decoding: each request gets exactly what peft gives it alone."""
    preset, tokenizer, loras, _ = setup
    engine = _engine(setup, len(LORAS), max_batch=16)
    names: list[str | None] = [f"job@{k}" for k in range(len(LORAS))] + [None]
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i]) for i in range(len(names))]
    first, later = jobs[:5], jobs[5:]
    engine.start()
    try:
        streams = [engine.submit(tokenizer(p)["input_ids"], a, _greedy(24)) for p, a in first]
        # Join mid-decode: once the first request has streamed two tokens.
        it = iter(streams[0])
        head = [next(it), next(it)]
        streams += [engine.submit(tokenizer(p)["input_ids"], a, _greedy()) for p, a in later]
        results = [[t for e in [*head, *it] for t in e.token_ids]] + [_collect(s)[0] for s in streams[1:]]
        stats = engine.stats
    finally:
        engine.stop()
    for (prompt, adapter), got, n in zip(jobs, results, [24] * 5 + [MAX_TOKENS] * 4, strict=True):
        adapter_dir = loras[int(adapter.split("@")[1])] if adapter else None
        assert got == _reference(preset, tokenizer, adapter_dir, prompt, n), f"{adapter} on {prompt!r}"
    # Requests shared passes, and the later ones joined rows that were still running.
    assert max(stats["batch_sizes"]) > len(first)
    assert stats["batches"] == 1  # every LoRA, the one on the output layer too, shared the base's passes
    assert stats["tokens_generated"] == sum(len(r) for r in results)
    assert len(stats["ttft_seconds"]) == len(jobs)


def test_prefill_budget_splits_a_burst(setup) -> None:  # type: ignore[no-untyped-def]
    """With a small prefill budget, a burst joins over several passes and still decodes exactly."""
    preset, tokenizer, loras, _ = setup
    engine = _engine(setup, 3, max_prefill_tokens=40)
    jobs = [(PROMPTS[i], f"job@{i % 3}") for i in (1, 6, 3, 0)]
    streams = [engine.submit(tokenizer(p)["input_ids"], a, _greedy()) for p, a in jobs]
    engine.start()
    try:
        got = [_collect(s)[0] for s in streams]
        passes = engine.stats["forward_passes"]
    finally:
        engine.stop()
    for (prompt, adapter), tokens in zip(jobs, got, strict=True):
        assert tokens == _reference(preset, tokenizer, loras[int(adapter[-1])], prompt)
    assert passes > MAX_TOKENS + 1  # the four did not all prefill in one pass


def test_adapters_change_the_text(setup) -> None:  # type: ignore[no-untyped-def]
    """The test adapters matter: they do not all generate what the base generates."""
    preset, tokenizer, loras, _ = setup
    prompt = PROMPTS[1]
    outputs = {tuple(_reference(preset, tokenizer, d, prompt)) for d in [None, *loras[:4]]}
    assert len(outputs) >= 4


def test_ia3_adapter_runs_in_its_own_batch(setup) -> None:  # type: ignore[no-untyped-def]
    """A method that cannot share the LoRA pass is served through the same API, beside LoRA requests."""
    preset, tokenizer, loras, ia3 = setup
    engine = _engine(setup, 1)
    engine.add_adapter("ia3-job@1", ia3)
    engine.start()
    try:
        a = engine.submit(tokenizer(PROMPTS[0])["input_ids"], "ia3-job@1", _greedy())
        b = engine.submit(tokenizer(PROMPTS[3])["input_ids"], "job@0", _greedy())
        c = engine.submit(tokenizer(PROMPTS[4])["input_ids"], "ia3-job@1", _greedy())
        d = engine.submit(tokenizer(PROMPTS[5])["input_ids"], None, _greedy())
        got = [_collect(s)[0] for s in (a, b, c, d)]
    finally:
        engine.stop()
    assert got[0] == _reference(preset, tokenizer, ia3, PROMPTS[0])
    assert got[1] == _reference(preset, tokenizer, loras[0], PROMPTS[3])
    assert got[2] == _reference(preset, tokenizer, ia3, PROMPTS[4])
    # Its batch runs on the base's own tensors, which it leaves as they were.
    assert got[3] == _reference(preset, tokenizer, None, PROMPTS[5])
    assert sorted(engine.adapters()) == ["ia3-job@1", "job@0"]
    assert engine.stats["batches"] == 2


def _greedy_without_cache(model: PeftModel, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes of peft's own model, no KV cache: the definition."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([prompt + out])
            out.append(int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
    return out


def test_prompt_tuning_and_loha_run_in_their_own_batches(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Virtual tokens go before each prompt of a padded batch; LoHa layers run on a weight-sharing copy.

    Prompt tuning is checked against peft's full forward pass rather than its `generate`, which
    with peft 0.21 and transformers 5.25 drifts from that forward pass after the first token.
    """
    preset, tokenizer, _, _ = setup
    configs = {"pt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
               "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)}
    engine = _engine(setup)
    for name, config in configs.items():
        torch.manual_seed(3)
        model = get_peft_model(load_causal_lm(preset, CPU), config)
        if name == "pt":
            with torch.no_grad():
                model.prompt_encoder["default"].embedding.weight.normal_(0, 1)
        model.save_pretrained(tmp_path / name)
        engine.add_adapter(name, tmp_path / name)
    jobs = [(name, prompt) for name in configs for prompt in (PROMPTS[0], PROMPTS[6])]
    got, stats = _run_greedy(engine, tokenizer, [(p, name) for name, p in jobs])
    assert stats["batches"] == 3
    for (name, prompt), tokens in zip(jobs, got, strict=True):
        if name == "loha":
            assert tokens == _reference(preset, tokenizer, tmp_path / name, prompt)
        else:
            model = PeftModel.from_pretrained(load_causal_lm(preset, CPU), tmp_path / name).eval()
            assert tokens == _greedy_without_cache(model, tokenizer(prompt)["input_ids"], MAX_TOKENS)


def test_seed_reproduces_sampled_text_in_any_batch(setup) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer, _, _ = setup
    engine = _engine(setup, 2)
    prompt = tokenizer(PROMPTS[3])["input_ids"]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    engine.start()
    try:
        alone = _collect(engine.submit(prompt, "job@1", params))[1]
        # The same request again, now among others with other adapters, seeds and lengths.
        crowd = [engine.submit(tokenizer(p)["input_ids"], "job@0", SamplingParams(max_tokens=20, seed=i))
                 for i, p in enumerate(PROMPTS[:4])]
        again = engine.submit(prompt, "job@1", params)
        other = engine.submit(prompt, "job@1", SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99))
        texts = [_collect(s)[1] for s in [again, other, *crowd]]
    finally:
        engine.stop()
    assert texts[0] == alone
    assert texts[1] != alone


def test_stop_strings_and_length(setup) -> None:  # type: ignore[no-untyped-def]
    """Text ends before the first stop string (never streamed in part); max_tokens ends with "length"."""
    preset, tokenizer, loras, _ = setup
    full = tokenizer.decode(_reference(preset, tokenizer, loras[1], PROMPTS[0], 20), skip_special_tokens=True)
    stop = full[5:7]
    expected = full[: full.find(stop)]
    engine = _engine(setup, 2)
    engine.start()
    try:
        prompt = tokenizer(PROMPTS[0])["input_ids"]
        stopped = engine.submit(prompt, "job@1", _greedy(20, stop=("never there", stop)))
        events = list(stopped)
        limited = engine.submit(prompt, "job@1", _greedy(7, stop=("never there",)))
        ids, text, reason = _collect(limited)
    finally:
        engine.stop()
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"
    assert all(e.finish_reason is None for e in events[:-1])
    assert (len(ids), reason, limited.completion_tokens, limited.prompt_tokens) == (7, "length", 7, len(prompt))
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_cancel_frees_the_row(setup) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer, _, _ = setup
    engine = _engine(setup, 1)
    engine.start()
    try:
        long = engine.submit(tokenizer(PROMPTS[1])["input_ids"], "job@0", _greedy(200))
        it = iter(long)
        next(it)
        long.cancel()
        assert len(list(it)) < 200  # the stream ends without running to max_tokens
        deadline = time.time() + 30
        while engine.stats["requests_running"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats["requests_running"] == 0
        ids, _, reason = _collect(engine.submit(tokenizer(PROMPTS[0])["input_ids"], None, _greedy(3)))
    finally:
        engine.stop()
    assert long.completion_tokens < 200
    assert (len(ids), reason) == (3, "length")


def test_async_events(setup) -> None:  # type: ignore[no-untyped-def]
    preset, tokenizer, loras, _ = setup
    engine = _engine(setup, 1)

    async def consume() -> list[TokenEvent]:
        stream = engine.submit(tokenizer(PROMPTS[2])["input_ids"], "job@0", _greedy())
        return [e async for e in stream.events()]

    engine.start()
    try:
        events = asyncio.run(consume())
    finally:
        engine.stop()
    assert [t for e in events for t in e.token_ids] == _reference(preset, tokenizer, loras[0], PROMPTS[2])


def test_refusals_change_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer, loras, _ = setup
    engine = _engine(setup, 1, max_queue=2, max_context=32)
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    with pytest.raises(InvalidInput, match=r"40 tokens.*context holds 32"):
        engine.submit(list(range(5, 45)), None, _greedy())
    with pytest.raises(NotFound, match="no adapter named 'job@9'.*job@0"):
        engine.submit(prompt, "job@9", _greedy())
    with pytest.raises(InvalidInput, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidInput, match="cannot read a peft adapter config"):
        engine.add_adapter("broken", loras[0].parent)
    first = [engine.submit(prompt, "job@0", _greedy(3)) for _ in range(2)]
    with pytest.raises(LimitExceeded, match="2 requests are already waiting"):
        engine.submit(prompt, "job@0", _greedy(3))
    assert engine.stats["requests_waiting"] == 2 and engine.adapters() == ["job@0"]
    engine.start()
    try:
        assert [_collect(s)[2] for s in first] == ["length", "length"]
        # A row that reaches the context ends with "length" there.
        ids, _, reason = _collect(engine.submit(list(range(5, 30)), None, _greedy(50)))
    finally:
        engine.stop()
    assert (len(ids), reason) == (32 - 25, "length")


def test_remove_and_replace_adapters(setup) -> None:  # type: ignore[no-untyped-def]
    """A request accepted before a removal finishes on its adapter; a replaced name serves the new weights."""
    preset, tokenizer, loras, _ = setup
    engine = _engine(setup, 2)
    prompt = tokenizer(PROMPTS[4])["input_ids"]
    early = engine.submit(prompt, "job@1", _greedy())
    engine.remove_adapter("job@1")
    with pytest.raises(NotFound):
        engine.submit(prompt, "job@1", _greedy())
    engine.add_adapter("job@0", loras[3])  # the name now serves other weights
    engine.start()
    try:
        before = _collect(early)[0]
        after = _collect(engine.submit(prompt, "job@0", _greedy()))[0]
        deadline = time.time() + 30
        while engine.stats["adapters_resident"] > 1 and time.time() < deadline:  # freed once idle
            time.sleep(0.01)
    finally:
        engine.stop()
    assert before == _reference(preset, tokenizer, loras[1], PROMPTS[4])
    assert after == _reference(preset, tokenizer, loras[3], PROMPTS[4])
    assert engine.adapters() == ["job@0"] and engine.stats["adapters_resident"] == 1
    # Down to no adapter at all (an LRU evicting everything), then one again.
    engine.remove_adapter("job@0")
    engine.start()
    try:
        deadline = time.time() + 30
        while engine.stats["adapters_resident"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats["adapters_resident"] == 0
        engine.add_adapter("job@2", loras[2])
        again = _collect(engine.submit(prompt, "job@2", _greedy()))[0]
        base = _collect(engine.submit(prompt, None, _greedy()))[0]
    finally:
        engine.stop()
    assert again == _reference(preset, tokenizer, loras[2], PROMPTS[4])
    assert base == _reference(preset, tokenizer, None, PROMPTS[4])


def test_incremental_text_never_splits_a_character_or_leaks_a_stop_string() -> None:
    """With a byte-level BPE (characters spread over several tokens), the streamed pieces join up
    to the full decode, no piece holds half a character, and text ends before the first stop string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedtune.serving.sampling import CompletionText

    texts = ["héllo wörld, naïve café ☕ 日本語のテキスト 🎉🎉 done", "ünïcödé ✓✓ ∑∫ 中文 plain ascii"] * 10
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # A small vocabulary: most non-ASCII characters stay split into their bytes.
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    for text in texts[:2]:
        ids = tokenizer(text)["input_ids"]
        full = tokenizer.decode(ids)
        for stop in [(), ("☕",), ("∑∫", "zzz"), ("zzz",)]:
            completion = CompletionText(tokenizer, stop)
            pieces, stopped = [], False
            for i, token in enumerate(ids):
                piece, stopped = completion.add(token, final=i == len(ids) - 1)
                pieces.append(piece)
                if stopped:
                    break
            cut = min((full.find(s) for s in stop if s in full), default=len(full))
            assert "".join(pieces) == full[:cut]
            assert stopped == (cut < len(full))
            assert not any("\ufffd" in p for p in pieces)


def test_gpt2_conv1d_lora_shares_the_pass(tmp_path: Path) -> None:
    """Another family: GPT-2's fused Conv1D projections (fan_in_fan_out LoRA) and learned positions."""
    preset = materialize_preset("tiny-gpt2", tmp_path / "preset")
    tokenizer = load_tokenizer(preset)
    configs = [{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]},
               {"r": 2, "lora_alpha": 4, "target_modules": ["c_fc", "c_proj"]}]
    engine = GenerationEngine(load_causal_lm(preset, CPU), tokenizer)
    dirs = []
    for k, config in enumerate(configs):
        torch.manual_seed(k)
        model = get_peft_model(load_causal_lm(preset, CPU), LoraConfig(fan_in_fan_out=True, **config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / f"a{k}")
        dirs.append(tmp_path / f"a{k}")
        engine.add_adapter(f"a{k}", dirs[-1])
    jobs = [(PROMPTS[i], k) for i, k in ((0, 0), (1, 1), (3, None), (6, 0))]
    got, stats = _run_greedy(engine, tokenizer, [(p, None if k is None else f"a{k}") for p, k in jobs])
    assert stats["batches"] == 1
    for (prompt, k), tokens in zip(jobs, got, strict=True):
        assert tokens == _reference(preset, tokenizer, None if k is None else dirs[k], prompt)


def test_adapter_with_changed_base_weights_gets_its_own_copy(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A LoRA file that carries a changed output layer (peft saves it when LoRA targets it) cannot
    share the base's pass and must not write into the shared base: it runs on a private copy of that layer."""
    from safetensors.torch import load_file, save_file

    preset, tokenizer, loras, _ = setup
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "adapter_config.json").write_bytes((loras[2] / "adapter_config.json").read_bytes())
    state = load_file(str(loras[2] / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.base_layer.weight"
    state[key] = state[key] + 0.5 * torch.randn_like(state[key])
    save_file(state, str(changed / "adapter_model.safetensors"))
    engine = _engine(setup, 1)
    engine.add_adapter("changed", changed)
    got, stats = _run_greedy(engine, tokenizer, ((PROMPTS[0], "changed"), (PROMPTS[0], None), (PROMPTS[3], "job@0")))
    assert stats["batches"] == 2
    assert got[0] == _reference(preset, tokenizer, changed, PROMPTS[0])
    assert got[0] != _reference(preset, tokenizer, loras[2], PROMPTS[0])
    assert got[1] == _reference(preset, tokenizer, None, PROMPTS[0])
    assert got[2] == _reference(preset, tokenizer, loras[0], PROMPTS[3])


def test_a_failed_pass_ends_its_requests_with_error_and_the_engine_goes_on(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fedtune.serving.batch import RunningBatch

    preset, tokenizer, loras, _ = setup
    join = RunningBatch.join
    calls = []

    def failing_once(self, prompts, routes):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return join(self, prompts, routes)

    monkeypatch.setattr(RunningBatch, "join", failing_once)
    engine = _engine(setup, 1)
    # Two lengths far apart: two prefill groups, the second never reaches the batch.
    failed = [engine.submit(tokenizer(p)["input_ids"], "job@0", _greedy()) for p in (PROMPTS[2], PROMPTS[6])]
    engine.start()
    try:
        reasons = [_collect(s)[2] for s in failed]
        tokens = _collect(engine.submit(tokenizer(PROMPTS[3])["input_ids"], "job@0", _greedy()))[0]
        stats = engine.stats
    finally:
        engine.stop()
    assert reasons == ["error", "error"]
    assert tokens == _reference(preset, tokenizer, loras[0], PROMPTS[3])
    assert stats["requests_running"] == stats["requests_waiting"] == 0
