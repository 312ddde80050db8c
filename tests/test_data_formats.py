"""Data formats, schemas, chat templates, packing and `fedtune data check`.

Every format and schema is checked against a hand-built reference: the token ids of the tiny
character-level tokenizer (one token per character) and the loss mask a person would mark.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.data import (
    IGNORE_INDEX,
    Chat,
    Example,
    check_packing,
    collate,
    load_data,
    load_jsonl,
    read_data,
    tokenize,
)
from fedtune.errors import ExitCode, InvalidInput
from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

PAIRS = [{"prompt": "q: ab ->", "response": " ba"}, {"prompt": "", "response": "free"}]
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                  {"role": "assistant", "content": "d"}]},
]


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def tok(preset: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(preset)


def chars(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The character tokenizer's ids of `text`, looked up one character at a time."""
    return list(tok.convert_tokens_to_ids(list(text)))


def reference(tok, *parts: tuple[str, bool], bos: bool = False, eos: bool = False) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """ids and labels from (text, trained) parts, built without fedtune's rendering."""
    ids: list[int] = [tok.bos_token_id] if bos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for text, trained in parts:
        piece = chars(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if eos:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return {"input_ids": ids, "labels": labels}


def pair_reference(tok, prompt: str, response: str) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    return reference(tok, (prompt, False), (response, True), bos=True, eos=True)


CHATML_REFERENCE = [
    [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("yo<|im_end|>\n", True)],
    [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False),
     ("b<|im_end|>\n", True),
     ("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", False), ("d<|im_end|>\n", True)],
]


# ---------------------------------------------------------------------------- formats
def write(path: Path, records: list[dict[str, Any]], fmt: str) -> Path:
    """Writes records in a format with that format's own library or the stdlib."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "json-data":
        path.write_text(json.dumps({"version": 1, "data": records}))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                             for r in records)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "datasets":
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif fmt == "datasetdict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                              "test": datasets.Dataset.from_list(records[:1])}).save_to_disk(str(path))
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "json-data": ".json", "csv": ".csv", "parquet": ".parquet",
          "datasets": "", "datasetdict": ""}


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_format_gives_the_same_tokens_and_masks(tok, tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"pairs{SUFFIX[fmt]}", PAIRS, fmt)
    loaded = load_data(path)
    assert list(loaded) == [Example(r["prompt"], r["response"]) for r in PAIRS]
    assert list(tokenize(loaded, tok, 64)) == [pair_reference(tok, r["prompt"], r["response"]) for r in PAIRS]
    chats = write(tmp_path / f"chats{SUFFIX[fmt]}", CHATS, fmt)
    got = tokenize(load_data(chats), tok, 256)
    assert list(got) == [reference(tok, *parts) for parts in CHATML_REFERENCE]
    if fmt == "datasetdict":
        assert load_data(path).source.note.startswith("the train split of a DatasetDict")


def test_the_format_can_be_forced(tok, tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.txt", PAIRS, "jsonl")
    with pytest.raises(InvalidInput, match=r"cannot tell the data format from the suffix '.txt'"):
        load_data(path)
    assert list(load_data(path, format="jsonl")) == list(load_data(write(tmp_path / "p.jsonl", PAIRS, "jsonl")))


# ---------------------------------------------------------------------------- schemas
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\nsort\n\n### Input:\ncab\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nsay hi\n\n### Response:\n")


@pytest.mark.parametrize(("records", "data", "expected"), [
    (PAIRS, None, lambda t: [pair_reference(t, r["prompt"], r["response"]) for r in PAIRS]),
    ([{"text": "hello"}], None, lambda t: [pair_reference(t, "", "hello")]),
    ([{"instruction": "sort", "input": "cab", "output": "abc"}, {"instruction": "say hi", "output": "hi"},
      {"instruction": "say hi", "input": "", "output": "hi"}], None,
     lambda t: [pair_reference(t, ALPACA, "abc"), pair_reference(t, ALPACA_NO_INPUT, "hi"),
                pair_reference(t, ALPACA_NO_INPUT, "hi")]),
    (CHATS, None, lambda t: [reference(t, *parts) for parts in CHATML_REFERENCE]),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
      {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "a"},
                         {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                         {"from": "assistant", "value": "d"}]}], None,
     lambda t: [reference(t, *parts) for parts in CHATML_REFERENCE]),
    ([{"question": r["prompt"], "answer": r["response"]} for r in PAIRS], {"prompt": "question", "response": "answer"},
     lambda t: [pair_reference(t, r["prompt"], r["response"]) for r in PAIRS]),
    ([{"dialog": c["messages"]} for c in CHATS], {"messages": "dialog"},
     lambda t: [reference(t, *parts) for parts in CHATML_REFERENCE]),
])
def test_every_schema_gives_the_hand_built_tokens_and_masks(tok, tmp_path: Path, records, data, expected) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "d.jsonl", records, "jsonl")
    assert list(tokenize(load_data(path, data), tok, 512, data)) == expected(tok)


def test_a_file_read_before_the_job_is_known_is_read_again_under_its_column_names(tok, tmp_path: Path) -> None:
    path = write(tmp_path / "qa.csv", [{"question": "q", "answer": "a"}], "csv")
    with pytest.raises(InvalidInput, match=r"keys found \('answer', 'question'\)"):
        load_data(path)
    early = read_data(path)  # what a client does before it joins: the format is checked, the schema waits
    mapping = {"prompt": "question", "response": "answer"}
    assert list(tokenize(early, tok, 64, mapping)) == [pair_reference(tok, "q", "a")]
    with pytest.raises(InvalidInput, match=r"qa.csv: row 1: cannot detect the schema"):
        tokenize(early, tok, 64)
    # A file loaded under other names is read again under the job's.
    both = write(tmp_path / "both.jsonl", [{"prompt": "p", "response": "r"}], "jsonl")
    swapped = tokenize(load_data(both), tok, 64, {"prompt": "response", "response": "prompt"})
    assert list(swapped) == [pair_reference(tok, "r", "p")]


# ---------------------------------------------------------------------------- chat templates
# A template with a known rendering: "[role]content", an assistant turn closed by the eos token.
KNOWN = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_a_known_template_masks_exactly_the_assistant_tokens_and_its_end_of_turn(tok) -> None:
    chat = Chat((("user", "hi"), ("assistant", "yo"), ("user", "ab"), ("assistant", "cd")))
    [item] = tokenize([chat], tok, 128, {"chat_template": KNOWN})
    eos = tok.eos_token_id
    expected_ids = chars(tok, "[user]hi[assistant]") + chars(tok, "yo") + [eos] + chars(
        tok, "[user]ab[assistant]") + chars(tok, "cd") + [eos]
    n1, n2 = len("[user]hi[assistant]"), len("[user]ab[assistant]")
    expected_labels = ([IGNORE_INDEX] * n1 + chars(tok, "yo") + [eos] + [IGNORE_INDEX] * n2 + chars(tok, "cd")
                       + [eos])
    assert item == {"input_ids": expected_ids, "labels": expected_labels}


def test_system_prompt_is_added_only_where_a_conversation_has_no_system_turn(tok) -> None:
    spec = {"system_prompt": "be brief"}
    plain = Chat((("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))
    own = Chat((("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))
    other = Chat((("system", "S"), ("user", "a"), ("assistant", "b")))
    with_prompt, with_own, with_other = tokenize([plain, own, other], tok, 256, spec)
    assert with_prompt == with_own == reference(tok, *CHATML_REFERENCE[1])
    prompt = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
    assert with_other == reference(tok, (prompt, False), ("b<|im_end|>\n", True))


def test_pairs_as_chat_renders_a_pair_as_one_user_and_one_assistant_turn(tok) -> None:
    out = tokenize([Example("hi", "yo"), Example("", "text stays text")], tok, 128, {"pairs_as_chat": True})
    assert list(out) == [reference(tok, *CHATML_REFERENCE[0]), pair_reference(tok, "", "text stays text")]


def test_template_choice_auto_tokenizer_default_and_errors(tok, tmp_path: Path) -> None:
    chat = [Chat((("user", "hi"), ("assistant", "yo")))]
    with pytest.raises(InvalidInput) as info:
        tokenize(chat, tok, 128, {"chat_template": "tokenizer"})
    assert str(info.value).startswith("job asks for the tokenizer's chat template but the tokenizer of ")
    assert str(tok.name_or_path) in str(info.value)
    tok.chat_template = KNOWN  # a tokenizer with a template of its own
    try:
        own = tokenize(chat, tok, 128)
        assert own.template == "the tokenizer's own"
        assert list(own) == list(tokenize(chat, tok, 128, {"chat_template": "tokenizer"}))
        assert list(own) == list(tokenize(chat, tok, 128, {"chat_template": KNOWN}))
        default = tokenize(chat, tok, 128, {"chat_template": "default"})
        assert list(default) == [reference(tok, *CHATML_REFERENCE[0])]
    finally:
        tok.chat_template = None
    # A template that rewrites earlier text as turns are added cannot mark turns exactly.
    counting = "{{ messages|length }}" + KNOWN
    two = [Chat((("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), "chats.jsonl:7")]
    with pytest.raises(InvalidInput, match=r"^chats.jsonl:7: the chat template does not render the conversation "
                                           r"prefix by prefix at turn 2"):
        tokenize(two, tok, 128, {"chat_template": counting})
    with pytest.raises(InvalidInput, match=r"the chat template fails at turn 2: "):
        tokenize(two, tok, 128, {"chat_template": "{{ raise_exception('no system role') }}"})


# ---------------------------------------------------------------------------- bad inputs
def one_line_error(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def bad_chat(*roles: str) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": "x"} for r in roles]}


@pytest.mark.parametrize(("record", "problem"), [
    ({"question": "q", "answer": "a"}, "cannot detect the schema from the keys found ('answer', 'question')"),
    (bad_chat("user", "user", "assistant"), "turn 2: role 'user' where 'assistant' was expected"),
    (bad_chat("assistant", "user"), "turn 1: role 'assistant' where 'user' was expected"),
    (bad_chat("user", "assistant", "system", "assistant"),
     "turn 3: role 'system' where 'user' was expected; a system turn only comes first"),
    (bad_chat("system", "user"), "no assistant turn"),
    (bad_chat("user"), "no assistant turn"),
    (bad_chat("user", "assistant", "user"), "ends with a user turn"),
    ({"messages": []}, "'messages' must be a non-empty array of turns, got an empty array"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "turn 1: unknown role 'tool'"),
    ({"messages": [{"role": "user", "text": "x"}]}, "turn 1: expected an object with 'role' and 'content'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, "unknown from 'bot'"),
    ({"instruction": "i", "output": "o", "extra": 1}, "unexpected key(s) 'extra'"),
    ({"instruction": "i"}, "missing key(s) 'output'"),
    ({"instruction": "i", "input": 3, "output": "o"}, "'input' must be a string, got number"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path: Path, record: dict[str, Any], problem: str) -> None:
    path = write(tmp_path / "d.jsonl", [PAIRS[0], record], "jsonl")
    message = one_line_error(lambda: load_data(path))
    assert message.startswith(f"{path}:2: ") and problem in message, message


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_malformed_json_lines_name_the_right_column(tmp_path: Path, newline: str) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps(PAIRS[0])
    cut = '{"prompt": "a", "response": "b"'  # 31 characters, the closing brace missing
    path.write_bytes(newline.join([good, cut, good, ""]).encode())
    assert one_line_error(lambda: load_data(path)) == (
        f"{path}:2: not valid JSON: Expecting ',' delimiter at the end of the line (column 32)")
    path.write_bytes(newline.join([good, '{"prompt": "a",, "response": "b"}', ""]).encode())
    assert one_line_error(lambda: load_data(path)) == (
        f"{path}:2: not valid JSON: Expecting property name enclosed in double quotes at column 16")


def test_rows_are_named_in_csv_parquet_json_and_datasets(tmp_path: Path) -> None:
    records = [PAIRS[0], PAIRS[0], {"prompt": "p", "response": ""}]
    for fmt, where in (("csv", "row 3"), ("parquet", "row 3"), ("datasets", "row 3"), ("json", "record 3")):
        path = write(tmp_path / f"d{SUFFIX[fmt]}", records, fmt)
        assert one_line_error(lambda: load_data(path)) == f"{path}: {where}: 'response' is empty"  # noqa: B023
    short = tmp_path / "short.csv"
    short.write_text("prompt,response\na,b\nc\n")
    assert one_line_error(lambda: load_data(short)) == f"{short}: row 2: has 1 fields, the header has 2"
    chats = write(tmp_path / "c.parquet", [CHATS[0], bad_chat("user", "user")], "parquet")
    assert one_line_error(lambda: load_data(chats)).startswith(f"{chats}: row 2: turn 2: role 'user'")
    wrong = tmp_path / "items.json"
    wrong.write_text(json.dumps([PAIRS[0], "text"]))
    assert one_line_error(lambda: load_data(wrong)) == f"{wrong}: record 2: expected an object, got string"


def test_undetectable_and_unreadable_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain").mkdir()
    assert "not a dataset saved with datasets' save_to_disk" in one_line_error(lambda: load_data(tmp_path / "plain"))
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n")
    assert "name the file .jsonl" in one_line_error(lambda: load_data(lines))
    splits = write(tmp_path / "nosplit", PAIRS, "datasets")
    datasets.DatasetDict({"validation": datasets.load_from_disk(str(splits))}).save_to_disk(str(tmp_path / "dd"))
    assert "without a 'train' split (splits: validation)" in one_line_error(lambda: load_data(tmp_path / "dd"))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    assert one_line_error(lambda: load_data(garbage)).startswith(f"{garbage}: not a readable parquet file")
    path = write(tmp_path / "d.parquet", PAIRS, "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert one_line_error(lambda: load_data(path)) == "reading parquet needs pyarrow: pip install 'fedtune[data]'"


def test_load_jsonl_still_reads_jsonl_of_any_schema(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [PAIRS[0], CHATS[0]], "jsonl")
    assert list(load_jsonl(path)) == [Example("q: ab ->", " ba"), Chat((("user", "hi"), ("assistant", "yo")))]


# ---------------------------------------------------------------------------- too long
def test_too_long_truncates_or_drops_and_counts(tok) -> None:
    examples = [Example("ab", "cdefgh"), Example("a", "b"), Example("a" * 20, "b")]
    cut = tokenize(examples, tok, 6)
    assert (cut.truncated, cut.dropped, cut.examples, cut.lengths) == (1, 1, 2, [10, 4, 23])
    assert [len(item["input_ids"]) for item in cut] == [6, 4]
    dropped = tokenize(examples, tok, 6, {"too_long": "drop"})
    assert (dropped.truncated, dropped.dropped, dropped.examples) == (0, 2, 1)
    assert list(dropped) == [pair_reference(tok, "a", "b")]


# ---------------------------------------------------------------------------- packing
PACK = [Example("abc", "defg"), Example("", "hello world"), Example("q", "r"), Example("xy", "z")]


def test_packing_restarts_positions_and_never_trains_across_examples(tok) -> None:
    plain = tokenize(PACK, tok, 24)
    packed = tokenize(PACK, tok, 24, packing=True)
    assert packed.examples == 4 and len(packed) == 2
    lengths = [len(item["input_ids"]) for item in plain]  # 9, 13, 4, 5: rows of 9+13 and 4+5
    assert [len(row["input_ids"]) for row in packed] == [22, 9]
    first, second = packed
    assert first["position_ids"] == [*range(lengths[0]), *range(lengths[1])]
    assert first["input_ids"] == plain[0]["input_ids"] + plain[1]["input_ids"]
    # The label at each example's start would be predicted from the previous example's last token.
    assert first["labels"] == [IGNORE_INDEX, *plain[0]["labels"][1:], IGNORE_INDEX, *plain[1]["labels"][1:]]
    assert second["labels"][lengths[2]] == IGNORE_INDEX

    batch = collate(packed, tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: transformers packs
    assert batch["position_ids"][1].tolist() == [*range(4), *range(5), *range(13)]  # padding: its own segment
    assert batch["labels"][1, 9:].tolist() == [IGNORE_INDEX] * 13
    from transformers.masking_utils import find_packed_sequence_indices

    segments = find_packed_sequence_indices(batch["position_ids"])
    assert segments is not None
    assert segments[0].tolist() == [0] * 9 + [1] * 13 and segments[1].tolist() == [0] * 4 + [1] * 5 + [2] * 13
    with pytest.raises(InvalidInput, match="mixes packed rows and single examples"):
        collate([packed[0], plain[0]], tok.pad_token_id)


def small_models(preset: Path, vocab: int):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    torch.manual_seed(0)
    for attn in ("sdpa", "eager"):
        yield "llama", attn, AutoModelForCausalLM.from_pretrained(preset, attn_implementation=attn)
        yield "gpt2", attn, AutoModelForCausalLM.from_config(GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=1, eos_token_id=2),
            attn_implementation=attn)
        yield "opt", attn, AutoModelForCausalLM.from_config(OPTConfig(
            hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, vocab_size=vocab,
            max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            attn_implementation=attn)


def test_packed_logits_equal_each_example_alone(tok, preset: Path) -> None:
    plain = tokenize(PACK, tok, 24)
    batch = collate(tokenize(PACK, tok, 24, packing=True), tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # the second row is padded
    for name, attn, model in small_models(preset, len(tok)):
        model.eval()
        with torch.no_grad():
            # use_cache=False: with a cache transformers does not look for packed sequences.
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            row, offset, worst = 0, 0, 0.0
            for item in plain:
                n = len(item["input_ids"])
                if offset + n > 24:
                    row, offset = row + 1, 0
                alone = model(input_ids=torch.tensor([item["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, (logits[row, offset:offset + n] - alone).abs().max().item())
                offset += n
        if name == "opt":
            # OPT builds its mask without the positions: attention crosses examples, so it is refused.
            assert worst > 1e-3, (name, attn)
            with pytest.raises(InvalidInput, match="OPT models build their attention mask without the position"):
                check_packing(model)
        else:
            assert worst < 1e-5, (name, attn, worst)
            check_packing(model)


def test_packing_is_refused_at_tokenization_for_opt(tok, tmp_path: Path) -> None:
    from transformers import OPTConfig

    tok.save_pretrained(tmp_path)
    OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    opt_tok = load_tokenizer(tmp_path)
    assert tokenize(PACK, opt_tok, 32)  # unpacked is fine
    with pytest.raises(InvalidInput, match=r"^training.packing: OPT models .* turn packing off for this base$"):
        tokenize(PACK, opt_tok, 32, packing=True)


# ---------------------------------------------------------------------------- fedtune data check
def sample(tmp_path: Path) -> Path:
    return write(tmp_path / "sample.jsonl", [
        {"prompt": "q: 1 ->", "response": " a"},
        *CHATS,
        {"text": "x" * 60},
        {"text": "y" * 70},
    ], "jsonl")


def test_data_check_prints_what_the_client_trains_on(preset: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtune.cli.main import app

    path = sample(tmp_path)
    result = CliRunner().invoke(app, ["data", "check", str(path), "--base", str(preset), "--max-seq-len", "50"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "format:    jsonl" in out
    assert "schema:    prompt/response (1), chat (2), text (2)" in out
    assert "records:   5" in out
    assert "template:  fedtune's default (ChatML)" in out
    # Lengths: 11 (bos, 7 + 2 characters, eos), 65 and 164 (the chats in ChatML), 62 and 72 (bos + text).
    assert "tokens:    p50 65  p90 164  p99 164  max 164  (after the template)" in out
    assert "too long:  2 truncated at max_seq_len 50" in out  # the texts
    # The chats' first assistant turns start past 50 tokens: nothing of them is left to train on.
    assert "trained:   3 examples" in out
    assert "(2 dropped: nothing left to train on once cut)" in out
    assert "<s>q: 1 ->[[ a</s>]]" in out

    spec = tmp_path / "job.yaml"
    spec.write_text(f"base_model: {preset}\ntraining: {{max_seq_len: 80, packing: true}}\n"
                    "data: {too_long: drop, system_prompt: S}\n")
    result = CliRunner().invoke(app, ["data", "check", str(path), "--spec", str(spec), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # The chats are over 80 tokens and dropped; 11 + 62 tokens pack into one row, 72 into another.
    assert (report["records"], report["truncated"], report["dropped"], report["kept"]) == (5, 0, 2, 3)
    assert report["packed_rows"] == 2 and report["too_long"] == "drop" and report["base"] == str(preset)
    # The system prompt adds 31 tokens to the chat without a system turn: 96; the other keeps its own.
    assert report["tokens"] == {"p50": 72, "p90": 164, "p99": 164, "max": 164}
    assert [part["trained"] for part in report["example"]] == [False, True]

    # No --base and no spec: the tiny-llama preset, materialized in the cache.
    result = CliRunner().invoke(app, ["data", "check", str(path)], env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("base:      tiny-llama\n") and "too long:  1 truncated at max_seq_len 128" in (
        result.stdout)


def test_data_check_errors_are_one_line_with_the_bad_input_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli.main import main

    path = write(tmp_path / "bad.csv", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}], "csv")
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(path), "--data-format", "csv"])
    assert info.value.code == ExitCode.BAD_INPUT
    assert capsys.readouterr().err.strip() == f"fedtune: error: {path}: row 2: 'response' is empty"


def test_partition_reads_any_format_under_the_job_column_names(tmp_path: Path) -> None:
    from fedtune.simulation.partition import partition

    records = [{"question": f"t{i % 2}: q{i}", "answer": "a"} for i in range(6)]
    path = write(tmp_path / "qa.parquet", records, "parquet")
    shares = partition(path, 2, "dirichlet:100", data_spec={"prompt": "question", "response": "answer"})
    assert sorted(r["question"] for share in shares for r in share) == sorted(r["question"] for r in records)
