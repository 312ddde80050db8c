"""Metrics beyond the loss (fedtune.metrics): token accuracy, exact match and multiple-choice accuracy,
each against a hand computation on a real tiny model; the multiple-choice data format; what a job
spec or a coordinator refuses; and the coordinator's evaluation returning them for a real job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedtune.cluster.shared_compute import EvalBatcher, batchable
from fedtune.coordinator.evaluator import Evaluator
from fedtune.coordinator.state import Job
from fedtune.data import IGNORE_INDEX, Choice, Example, load_data, read_data, tokenize
from fedtune.errors import InvalidInput
from fedtune.methods import METHODS, config_for, resolve_targets
from fedtune.metrics import evaluate_metrics, normalize_answer, score_choices
from fedtune.models import TINY_PRESET, base_model_type, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model, bytes_to_tensors, load_adapter_state
from fedtune.spec import parse_spec
from fedtune.training import train_adapter
from tests.conftest import Admin, make_spec

CPU = torch.device("cpu")
# A random base has near-uniform outputs; adapting lm_head lets LoRA move them (as in test_training).
TARGETS = ["q_proj", "v_proj", "lm_head"]
# What the memorising model is trained on: two pairs and a conversation (ChatML by default).
MEMORISED: list[dict[str, Any]] = [
    {"prompt": "capital of france?", "response": " Paris."},
    {"prompt": "2 + 3 =", "response": " five"},
    {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello there"}]},
]
UNSEEN: list[dict[str, Any]] = [
    {"prompt": "capital of italy?", "response": " Rome."},
    {"prompt": "7 - 4 =", "response": " three"},
    {"messages": [{"role": "user", "content": "say bye"}, {"role": "assistant", "content": "see you"}]},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """One torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tokenizer(base: Path) -> Any:
    return load_tokenizer(base)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _perturbed(base: Path, config: Any = None, seed: int = 0) -> Any:
    """A peft model whose trainable weights are random enough to change every output."""
    model = build_peft_model(load_causal_lm(base, CPU), config=config, r=4, alpha=8, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def memorised(base: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny LoRA model trained until it knows MEMORISED by heart (about 2 s on one CPU thread)."""
    records = load_data(_write(tmp_path_factory.mktemp("mem") / "train.jsonl", MEMORISED))
    model = build_peft_model(load_causal_lm(base, CPU), r=16, alpha=32, target_modules=TARGETS)
    train_adapter(model, tokenize(records, tokenizer, 96), pad_id=tokenizer.pad_token_id, lr=0.01, batch_size=3,
                  steps=120, epochs=None, seed=0, device=CPU, progress=False)
    return model.eval()


def _metrics(model: Any, tokenizer: Any, records: Any, names: list[str], **kwargs: Any) -> dict[str, float]:
    options = {"data": None, "max_seq_len": 96, "batch_size": 2, "device": CPU, **kwargs}
    return evaluate_metrics(model, tokenizer, records, names, **options)


def _hand_token_accuracy(model: Any, tokenized: list[dict[str, list[int]]], virtual: int = 0) -> tuple[int, int]:
    """One example at a time, no padding: is the argmax at t-1 the label at t, for every label."""
    correct = total = 0
    with torch.no_grad():
        for item in tokenized:
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, virtual:]
            for t in range(1, len(item["labels"])):
                if item["labels"][t] != IGNORE_INDEX:
                    total += 1
                    correct += int(logits[t - 1].argmax()) == item["labels"][t]
    return correct, total


def _greedy_text(model: Any, tokenizer: Any, prompt: str, n: int, virtual: int = 0) -> str:
    """The model's own greedy continuation of a prompt by plain forward passes (a response it
    predicts token for token, so its token accuracy is high and known)."""
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, virtual:]
            ids.append(int(logits[-1].argmax()))
    text = tokenizer.decode(ids[-n:])
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[-n:], "continuation is not plain text"
    return text


# ------------------------------------------------------------------ token accuracy


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_token_accuracy_is_the_hand_count_of_greedy_hits_whatever_the_batch(
        method: str, base: Path, tokenizer: Any, tmp_path: Path) -> None:
    virtual = 4 if method == "prompt_tuning" else 0
    config = config_for({"method": "prompt_tuning", "num_virtual_tokens": 4}) if virtual else None
    model = _perturbed(base, config)
    # Responses the model predicts itself (hits), others it does not, a chat and a question.
    rows: list[dict[str, Any]] = [{"prompt": p, "response": _greedy_text(model, tokenizer, p, 6, virtual)}
                                  for p in ("abc ->", "reverse: dcba ->")]
    rows += [UNSEEN[0], UNSEEN[2], {"prompt": "pick:", "choices": ["x", "yy"], "answer": 1}, {"text": "plain text"}]
    records = load_data(_write(tmp_path / "eval.jsonl", rows))
    correct, total = _hand_token_accuracy(model, tokenize(records, tokenizer, 96), virtual)
    assert 12 <= correct < total  # the two own continuations are hits (their eos may not be)
    for batch_size in (1, 4):
        got = _metrics(model, tokenizer, records, ["loss", "token_accuracy"], batch_size=batch_size)
        assert got == {"eval_token_accuracy": pytest.approx(correct / total), "eval_tokens": total}
    assert model.training is False


def test_metrics_keep_the_models_mode_and_take_what_read_data_gives(
        base: Path, tokenizer: Any, tmp_path: Path) -> None:
    model = _perturbed(base).train()
    path = _write(tmp_path / "eval.jsonl", [*UNSEEN, {"prompt": "pick:", "choices": ["x", "yy"], "answer": "x"}])
    from_file = _metrics(model, tokenizer, read_data(path), ["token_accuracy", "choice_accuracy", "exact_match"],
                         max_new_tokens=4)
    assert model.training is True
    assert from_file == _metrics(model, tokenizer, load_data(path), ["token_accuracy", "choice_accuracy",
                                                                    "exact_match"], max_new_tokens=4)
    assert set(from_file) == {"eval_token_accuracy", "eval_tokens", "eval_exact_match", "eval_exact_match_examples",
                              "eval_choice_accuracy", "eval_choice_accuracy_norm", "eval_choice_examples"}
    assert from_file["eval_exact_match_examples"] == 4 and from_file["eval_choice_examples"] == 1
    with pytest.raises(InvalidInput, match="unknown metric 'bleu'"):
        _metrics(model, tokenizer, load_data(path), ["bleu"])


# ------------------------------------------------------------------ exact match


@pytest.mark.parametrize(
    ("generated", "reference", "same"),
    [
        (" Paris.", "paris", True),
        ("  The   Answer!\n", "the answer", True),
        ("(42)", "42", True),
        ("3.14", "3,14", False),  # inner punctuation counts
        ("new york", "newyork", False),
        ("Paris is the capital", "Paris", False),
        ("", "", True),
    ],
)
def test_exact_match_normalises_case_whitespace_and_surrounding_punctuation(
        generated: str, reference: str, same: bool) -> None:
    assert (normalize_answer(generated) == normalize_answer(reference)) is same


def test_exact_match_is_one_for_what_the_model_memorised_and_zero_before_training(
        memorised: Any, tokenizer: Any, tmp_path: Path) -> None:
    records = load_data(_write(tmp_path / "mem.jsonl", MEMORISED))
    # 11 tokens are exactly "hello there": the chat's end-of-turn text (<|im_end|>) gets room of its own,
    # and the pairs must stop at eos to match.
    trained = _metrics(memorised, tokenizer, records, ["exact_match"], max_new_tokens=11)
    assert trained == {"eval_exact_match": 1.0, "eval_exact_match_examples": 3.0}
    with memorised.disable_adapter():
        assert _metrics(memorised, tokenizer, records, ["exact_match"])["eval_exact_match"] == 0.0
    # Unseen prompts are not answered; a reference written otherwise is still matched after normalising.
    other = load_data(_write(tmp_path / "other.jsonl", [UNSEEN[0], {"prompt": "2 + 3 =", "response": "FIVE!"}]))
    assert _metrics(memorised, tokenizer, other, ["exact_match"])["eval_exact_match"] == 0.5
    # The token accuracy of the memorised set is perfect; of unseen answers, it is not.
    assert _metrics(memorised, tokenizer, records, ["token_accuracy"])["eval_token_accuracy"] == 1.0
    assert _metrics(memorised, tokenizer, other, ["token_accuracy"])["eval_token_accuracy"] < 1.0


def test_exact_match_skips_plain_text_and_refuses_a_file_of_it(memorised: Any, tokenizer: Any, tmp_path: Path) -> None:
    mixed = load_data(_write(tmp_path / "mixed.jsonl", [MEMORISED[0], {"text": "just text"}]))
    assert _metrics(memorised, tokenizer, mixed, ["exact_match"]) == {"eval_exact_match": 1.0,
                                                                       "eval_exact_match_examples": 1.0}
    text = _write(tmp_path / "text.jsonl", [{"text": "just text"}, {"text": "more"}])
    with pytest.raises(InvalidInput, match=rf"^evaluation.metrics exact_match: {text} has no record with a prompt "
                                           r"and a response to compare \(plain text only\)$"):
        _metrics(memorised, tokenizer, load_data(text), ["exact_match"])
    # Not strict (a client's own held-out data): what cannot be scored is left out.
    assert _metrics(memorised, tokenizer, load_data(text), ["exact_match", "choice_accuracy", "token_accuracy"],
                    strict=False).keys() == {"eval_token_accuracy", "eval_tokens"}


# ------------------------------------------------------------------ multiple choice

QUESTIONS = [
    ("capital of france?", ["Paris", "Rome", "a much longer wrong answer"]),
    ("2 + 3 =", ["five", "4", "six"]),
    ("colour of the sky:", ["blue", "green"]),
    ("opposite of up:", ["down", "sideways", "u", "up"]),
    ("say hi", ["hello there", "bye"]),
    ("pick one", ["x", "yyyy", "zz"]),
]


def _hand_scores(model: Any, tokenizer: Any) -> list[list[float]]:
    """Each option alone: log p(option tokens | bos + prompt), summed."""
    out = []
    with torch.no_grad():
        for prompt, choices in QUESTIONS:
            context = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            scores = []
            for choice in choices:
                option = tokenizer(choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([context + option])).logits[0].float(), -1)
                scores.append(sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(option)))
            out.append(scores)
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def test_choice_accuracy_picks_the_option_of_highest_log_likelihood_as_by_hand(
        base: Path, tokenizer: Any, tmp_path: Path) -> None:
    model = _perturbed(base, seed=3)
    hand = _hand_scores(model, tokenizer)
    questions = [Choice.of(p, tuple(c), 0) for p, c in QUESTIONS]
    got = score_choices(model, tokenizer, questions, data=None, max_seq_len=96, batch_size=3, device=CPU)
    for g, h in zip(got, hand, strict=True):
        assert g == pytest.approx(h, abs=1e-4)
    best = [_argmax(s) for s in hand]
    best_norm = [_argmax([v / len(c) for v, c in zip(s, choices, strict=True)])
                 for s, (_, choices) in zip(hand, QUESTIONS, strict=True)]
    # The right answer is the model's pick for every other question, another option otherwise.
    answers = [b if i % 2 == 0 else (b + 1) % len(c) for i, (b, (_, c)) in enumerate(zip(best, QUESTIONS, strict=True))]
    want_norm = sum(a == b for a, b in zip(answers, best_norm, strict=True)) / len(QUESTIONS)
    by_index: list[dict[str, Any]] = [{"prompt": p, "choices": c, "answer": a}
                                      for (p, c), a in zip(QUESTIONS, answers, strict=True)]
    by_text = [{**r, "answer": r["choices"][r["answer"]]} for r in by_index]
    for rows in (by_index, by_text):
        records = load_data(_write(tmp_path / "mc.jsonl", [*rows, {"prompt": "a pair", "response": " too"}]))
        for batch_size in (1, 5):
            assert _metrics(model, tokenizer, records, ["choice_accuracy"], batch_size=batch_size) == {
                "eval_choice_accuracy": 0.5, "eval_choice_accuracy_norm": pytest.approx(want_norm),
                "eval_choice_examples": 6.0}
    assert best != best_norm  # the length normalisation changes some picks


def test_choice_accuracy_refuses_data_without_questions(base: Path, tokenizer: Any, tmp_path: Path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", UNSEEN[:2])
    with pytest.raises(InvalidInput, match=rf"^evaluation.metrics choice_accuracy: {pairs} has no multiple-choice "
                                           r"record \({prompt, choices, answer}\) to score$"):
        _metrics(_perturbed(base), tokenizer, load_data(pairs), ["choice_accuracy"])


# ------------------------------------------------------------------ the data format


def test_a_question_trains_as_its_prompt_and_right_option(tokenizer: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "mc.jsonl", [{"prompt": "sky:", "choices": [" green", " blue"], "answer": 1},
                                          {"prompt": "sky:", "choices": [" green", " blue"], "answer": " blue"}])
    records = load_data(path)
    assert records[0] == records[1] == Choice.of("sky:", (" green", " blue"), 1)
    assert records[0].response == " blue" and records.schemas == {"choice": 2}
    assert tokenize(records, tokenizer, 64) == tokenize([Example("sky:", " blue")] * 2, tokenizer, 64)
    csv = tmp_path / "mc.csv"
    csv.write_text('prompt,choices,answer\nsky:,"[""green"", ""blue""]",1\nsky:,"[""green"", ""blue""]",green\n')
    assert [r.answer for r in load_data(csv) if isinstance(r, Choice)] == [1, 0]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "'answer' 2 is out of range for 2 options (0 to 1)"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": -1}, "'answer' -1 is out of range for 2 options"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": "c"}, "'answer' 'c' is none of the 2 options"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": 1.5}, "'answer' must be an option's index (from 0)"),
        ({"prompt": "q", "choices": ["a"], "answer": 0}, "'choices' has 1 option; a question needs at least 2"),
        ({"prompt": "q", "choices": [], "answer": 0}, "'choices' has 0 options; a question needs at least 2"),
        ({"prompt": "q", "choices": ["a", " "], "answer": 0}, "'choices': option 1 is empty"),
        ({"prompt": "q", "choices": ["a", "a"], "answer": 0}, "'choices': option 1 repeats option 0 ('a')"),
        ({"prompt": "q", "choices": ["a", 2], "answer": 0},
         "'choices' must be an array of strings, got an array with number"),
        ({"prompt": "q", "choices": "a or b", "answer": 0}, "'choices' must be an array of options"),
        ({"prompt": "q", "answer": 0}, "missing key(s) 'choices' of a choice record"),
        ({"prompt": "q", "choices": ["a", "b"]}, "missing key(s) 'answer' of a choice record"),
        ({"choices": ["a", "b"], "answer": 0}, "missing key(s) 'prompt' of a choice record"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": 0, "response": "a"},
         "unexpected key(s) 'response'; a choice record has 'answer', 'choices', 'prompt'"),
    ],
)
def test_bad_questions_are_refused_naming_the_line_and_key(record: dict[str, Any], message: str,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(record)
                    + "\n")
    for read in (load_data, read_data):
        with pytest.raises(InvalidInput) as info:
            read(path)
        assert str(info.value).startswith(f"{path}:2: {message}")
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------ refusals


def test_peft_generates_what_its_forward_computes_exactly_for_the_methods_that_say_so(base: Path) -> None:
    """Each method's ``generates`` is what generate() does under the installed peft/transformers:
    greedy generation's logits at every step equal a plain forward pass over the same tokens."""
    model_type = base_model_type(base)
    options = {"adalora": {"init_r": 6, "target_r": 2}, "prompt_tuning": {"num_virtual_tokens": 4},
               "prefix_tuning": {"num_virtual_tokens": 4}, "bottleneck": {"bottleneck_size": 8}}
    ids = torch.tensor([[1, 50, 51, 52, 60, 61]])
    agrees = {}
    for name in METHODS:
        model = _perturbed(base, config_for(resolve_targets({"method": name, **options.get(name, {})}, model_type)))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            steps = [model(input_ids=out.sequences[:, :ids.size(1) + k]).logits[:, -1] for k in range(4)]
        agrees[name] = all(torch.allclose(g, f, atol=1e-4) for g, f in zip(out.logits, steps, strict=True))
    assert agrees == {name: method.generates for name, method in METHODS.items()}
    assert not agrees["prefix_tuning"] and not agrees["prompt_tuning"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("peft: {method: prefix_tuning}\nevaluation: {metrics: [loss, exact_match]}",
         "job spec: evaluation.metrics exact_match: peft cannot generate with peft.method prefix_tuning"),
        ("peft: {method: prompt_tuning}\nevaluation: {metrics: [exact_match]}",
         "job spec: evaluation.metrics exact_match: peft cannot generate with peft.method prompt_tuning"),
    ],
)
def test_exact_match_is_refused_for_methods_that_cannot_generate(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_spec(text)
    assert str(info.value).startswith(message)


def test_exact_match_refuses_a_model_of_such_a_method(base: Path, tokenizer: Any, tmp_path: Path) -> None:
    model = _perturbed(base, config_for({"method": "prefix_tuning", "num_virtual_tokens": 4}))
    records = load_data(_write(tmp_path / "pairs.jsonl", UNSEEN))
    with pytest.raises(InvalidInput, match="^evaluation.metrics exact_match: peft cannot generate with peft.method "
                                           "prefix_tuning$"):
        _metrics(model, tokenizer, records, ["exact_match"])
    assert set(_metrics(model, tokenizer, records, ["token_accuracy"])) == {"eval_token_accuracy", "eval_tokens"}


def test_what_the_spec_accepts_for_metrics() -> None:
    assert parse_spec("peft: {method: prefix_tuning}\nevaluation: {metrics: [token_accuracy, choice_accuracy]}"
                      ).evaluation.metrics == ["token_accuracy", "choice_accuracy"]
    assert parse_spec("peft: {method: ia3}\nevaluation: {metrics: [exact_match]}").evaluation.metrics == ["exact_match"]
    assert parse_spec("").evaluation.metrics == ["loss", "perplexity"]


def _refused(admin: Admin, spec: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value.details())


def test_create_refuses_metrics_the_eval_data_cannot_score(coordinator, admin: Admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pairs = _write(tmp_path / "pairs.jsonl", UNSEEN)
    text = _write(tmp_path / "text.jsonl", [{"text": "only text"}])
    spec = make_spec(pairs)
    assert _refused(admin, spec + "evaluation: {metrics: [loss, choice_accuracy]}\n") == (
        f"evaluation.metrics choice_accuracy: {pairs} has no multiple-choice record ({{prompt, choices, answer}}) "
        "to score")
    assert _refused(admin, make_spec(text) + "evaluation: {metrics: [exact_match]}\n") == (
        f"evaluation.metrics exact_match: {text} has no record with a prompt and a response to compare "
        "(plain text only)")
    prefix = spec.replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "peft: {method: prefix_tuning}")
    assert "evaluation.metrics exact_match: peft cannot generate with peft.method prefix_tuning" in _refused(
        admin, prefix + "evaluation: {metrics: [exact_match]}\n")
    assert coordinator.coordinator.state.jobs() == []


# ------------------------------------------------------------------ the coordinator's evaluation

EVAL_ROWS: list[dict[str, Any]] = [
    {"prompt": "reverse: abc ->", "response": " cba"},
    {"prompt": "upper: dea ->", "response": " DEA"},
    {"messages": [{"role": "user", "content": "copy: hgf"}, {"role": "assistant", "content": "hgf"}]},
    {"prompt": "sort: cab ->", "choices": [" abc", " cab", " bca"], "answer": 0},
    {"prompt": "reverse: fed ->", "choices": [" fed", " def"], "answer": " def"},
]
ALL = "evaluation: {metrics: [loss, perplexity, token_accuracy, exact_match, choice_accuracy], max_new_tokens: 16}\n"
EXTRA_KEYS = {"eval_token_accuracy", "eval_tokens", "eval_exact_match", "eval_exact_match_examples",
              "eval_choice_accuracy", "eval_choice_accuracy_norm", "eval_choice_examples"}


def _direct(model: Any, tokenizer: Any, path: Path) -> dict[str, float]:
    """What evaluate_metrics gives for the job's settings (max_seq_len 96, batch 8)."""
    return evaluate_metrics(model, tokenizer, load_data(path), ["token_accuracy", "exact_match", "choice_accuracy"],
                            data=None, max_seq_len=96, batch_size=8, device=CPU, max_new_tokens=16)


def _spec(path: Path, extra: str = "") -> str:
    """A small job (conftest's) on this eval file, long enough sequences for its conversation."""
    return make_spec(path).replace("max_seq_len: 48", "max_seq_len: 96") + extra


def _job(job_id: str, spec_text: str, base: Path) -> Job:
    return Job(job_id, job_id, parse_spec(spec_text).model_dump_json(), "running", 1, str(base), "h", "", "{}", None,
               "", 0.0)


def test_evaluator_adds_the_jobs_metrics_for_the_adapter_and_the_bare_base(
        base: Path, tokenizer: Any, memorised: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "eval.jsonl", [*MEMORISED, *EVAL_ROWS[3:]])
    # The memorising model's adapter, as a job's global adapter.
    peft = "peft: {r: 16, alpha: 32, target_modules: [q_proj, v_proj, lm_head]}"
    job = _job("job-m", _spec(path, ALL).replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", peft),
               base)
    adapter = adapter_state(memorised)
    evaluator = Evaluator(lambda _job: base, CPU)
    got = evaluator.evaluate(job, adapter)
    assert set(got) == {"eval_loss", "eval_ppl"} | EXTRA_KEYS
    assert {k: got[k] for k in EXTRA_KEYS} == pytest.approx(_direct(memorised, tokenizer, path))
    # The three memorised answers are generated, the two questions' options are not.
    assert got["eval_exact_match"] == pytest.approx(3 / 5) and got["eval_choice_examples"] == 2
    zero = evaluator.evaluate(job, None)
    assert set(zero) == {"eval_loss", "eval_ppl"} | EXTRA_KEYS
    with memorised.disable_adapter():
        assert {k: zero[k] for k in EXTRA_KEYS} == pytest.approx(_direct(memorised, tokenizer, path))
    assert zero["eval_exact_match"] == 0.0 and zero["eval_token_accuracy"] < got["eval_token_accuracy"]
    assert zero["eval_loss"] > got["eval_loss"]
    # A job that asks for loss only gets loss only; on Ray, jobs with more leave the batched pass.
    plain = _job("job-p", _spec(path), base)
    lora = build_peft_model(load_causal_lm(base, CPU), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    small = {k: torch.randn_like(v) * 0.3 for k, v in adapter_state(lora).items()}
    assert set(evaluator.evaluate(plain, small)) == {"eval_loss", "eval_ppl"}
    assert batchable(plain, small) and not batchable(job, adapter)
    batcher = EvalBatcher(Evaluator(lambda _job: base, CPU), base, load_causal_lm, CPU)
    both = batcher.evaluate_many([(job, adapter), (plain, small)])
    assert batcher.passes == []  # each alone
    assert both[0] == pytest.approx(got)


@pytest.mark.integration
def test_a_real_job_publishes_the_metrics_it_asks_for(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin, fed_data: tuple[list[Path], Path], tokenizer: Any, tmp_path: Path) -> None:
    from tests.test_methods import run_agent_threads

    clients, _ = fed_data
    path = _write(tmp_path / "eval.jsonl", EVAL_ROWS)
    job = admin.create_job(_spec(path, ALL))
    run_agent_threads(coordinator, admin, job, clients[:1], tmp_path)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    last = service.state.rounds(job)[-1]
    assert EXTRA_KEYS | {"eval_loss", "eval_ppl"} <= set(last.metrics)
    base_eval = json.loads(service.state.job(job).base_eval_json)
    assert EXTRA_KEYS | {"eval_loss", "eval_ppl"} <= set(base_eval)
    # The published metrics are those of the published adapter, as evaluate_metrics computes them.
    spec = service.spec(job)
    model = build_peft_model(load_causal_lm(service.base_dir(service.state.job(job)), CPU),
                             config=config_for(spec.peft.model_dump()))
    load_adapter_state(model, bytes_to_tensors(service.store.read(last.global_out)))
    assert {k: last.metrics[k] for k in EXTRA_KEYS} == pytest.approx(_direct(model.eval(), tokenizer, path))
    with model.disable_adapter():
        assert {k: base_eval[k] for k in EXTRA_KEYS} == pytest.approx(_direct(model, tokenizer, path))
    assert last.metrics["eval_choice_examples"] == 2 and last.metrics["eval_exact_match_examples"] == 5
