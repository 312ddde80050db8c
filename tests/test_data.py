"""Data file validation, prompt-masked tokenization, batching and the synthetic federation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedtune.data import (
    IGNORE_INDEX,
    Example,
    collate,
    load_jsonl,
    tokenize,
    write_synthetic_federation,
)
from fedtune.errors import InvalidInput
from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset")))


def _write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


def test_load_jsonl_reads_both_line_shapes_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        '{"prompt": "q: 1 ->", "response": " a"}',
        "",
        "   ",
        '{"text": "free text"}',
        '{"prompt": "", "response": "no prompt"}',
    )
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM, as Windows editors write
    assert load_jsonl(path) == [
        Example(prompt="q: 1 ->", response=" a"),
        Example(prompt="", response="free text"),
        Example(prompt="", response="no prompt"),
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "a", "response": ', "not valid JSON"),
        ('["prompt", "response"]', "expected a JSON object, got array"),
        ('"just a string"', "expected a JSON object, got string"),
        ('{"prompt": "a", "response": "b", "id": 3}', "unexpected key(s) 'id'"),
        ('{"text": "a", "prompt": "b"}', "unexpected key(s) 'prompt'"),
        ('{"prompt": "a"}', "missing key(s) 'response'"),
        ('{"response": "b"}', "missing key(s) 'prompt'"),
        ("{}", "missing key(s) 'prompt', 'response'"),
        ('{"prompt": 1, "response": "b"}', "'prompt' must be a string, got number"),
        ('{"prompt": "a", "response": null}', "'response' must be a string, got null"),
        ('{"text": ["a"]}', "'text' must be a string, got array"),
        ('{"prompt": "a", "response": ""}', "'response' is empty"),
        ('{"text": ""}', "'text' is empty"),
        (b'{"text": "\xff"}', "not valid UTF-8"),
    ],
)
def test_load_jsonl_names_file_and_line_of_a_bad_line(
    tmp_path: Path, line: str | bytes, problem: str
) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "fine"}', "", line, '{"text": "never reached"}')
    with pytest.raises(InvalidInput) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message
    assert "\n" not in message


def test_load_jsonl_rejects_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no such data file") as info:
        load_jsonl(tmp_path / "absent.jsonl")
    assert str(info.value).startswith(f"{tmp_path / 'absent.jsonl'}: ")

    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidInput) as info:
            load_jsonl(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: data file has no examples"


def test_tokenize_masks_the_prompt(tokenizer) -> None:
    [item] = tokenize([Example(prompt="upper: ab ->", response=" AB")], tokenizer, max_seq_len=64)
    ids, labels = item["input_ids"], item["labels"]
    prompt_len = 1 + len("upper: ab ->")  # bos + one token per character
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(labels) == prompt_len + len(" AB") + 1
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:-1]) == " AB"


def test_tokenize_text_lines_train_on_every_token(tokenizer) -> None:
    [item] = tokenize([Example(prompt="", response="hello")], tokenizer, max_seq_len=64)
    assert item["labels"][0] == IGNORE_INDEX  # bos itself is never a target
    assert item["labels"][1:] == item["input_ids"][1:]


def test_tokenize_truncates_and_drops_examples_without_response_tokens(tokenizer) -> None:
    examples = [Example(prompt="ab", response="cdef"), Example(prompt="a" * 10, response="b")]
    tokenized = tokenize(examples, tokenizer, max_seq_len=5)
    [kept] = tokenized
    assert len(kept["input_ids"]) == len(kept["labels"]) == 5
    # Counted for `fedtune data check`: the first is cut, the second has no response token left.
    assert (tokenized.truncated, tokenized.dropped, tokenized.examples) == (1, 1, 1)
    assert kept["labels"][3:] == kept["input_ids"][3:]  # response tokens that fit still count

    with pytest.raises(InvalidInput, match="max_seq_len=5"):
        tokenize(examples[1:], tokenizer, max_seq_len=5)
    with pytest.raises(InvalidInput, match="max_seq_len must be at least 2"):
        tokenize(examples, tokenizer, max_seq_len=1)


def test_collate_pads_right(tokenizer) -> None:
    items = tokenize([Example("a", "b"), Example("abc", "defg")], tokenizer, max_seq_len=64)
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (2, 9) and t.dtype == torch.long for t in batch.values())
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 5
    assert batch["input_ids"][0, 4:].tolist() == [tokenizer.pad_token_id] * 5
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX] * 5
    assert batch["input_ids"][1].tolist() == items[1]["input_ids"]


def test_synthetic_federation_is_deterministic_and_non_iid(tmp_path: Path) -> None:
    clients, eval_path = write_synthetic_federation(
        tmp_path / "a", n_clients=3, examples_per_client=50, seed=1
    )
    again, _ = write_synthetic_federation(tmp_path / "b", n_clients=3, examples_per_client=50, seed=1)
    other, _ = write_synthetic_federation(tmp_path / "c", n_clients=3, examples_per_client=50, seed=2)
    assert [p.name for p in clients] == ["client_0.jsonl", "client_1.jsonl", "client_2.jsonl"]
    assert eval_path.name == "eval.jsonl"
    assert [p.read_bytes() for p in clients] == [p.read_bytes() for p in again]
    assert clients[0].read_bytes() != other[0].read_bytes()

    main_tasks = []
    for path in clients:
        examples = load_jsonl(path)
        assert len(examples) == 50
        assert all(len(e.prompt + e.response) < 40 for e in examples)
        task, count = Counter(e.prompt.split(":")[0] for e in examples).most_common(1)[0]
        assert count >= 30  # mostly one task...
        assert count < 50  # ...but not only
        main_tasks.append(task)
    assert len(set(main_tasks)) == 3  # clients differ

    eval_tasks = Counter(e.prompt.split(":")[0] for e in load_jsonl(eval_path))
    assert sum(eval_tasks.values()) == 64
    assert len(eval_tasks) == 5 and max(eval_tasks.values()) - min(eval_tasks.values()) <= 1


def test_synthetic_lines_are_plain_prompt_response_objects(tmp_path: Path) -> None:
    _, eval_path = write_synthetic_federation(tmp_path, n_clients=1, examples_per_client=1, eval_examples=5)
    for line in eval_path.read_text().splitlines():
        assert set(json.loads(line)) == {"prompt", "response"}
    with pytest.raises(InvalidInput, match="n_clients must be at least 1"):
        write_synthetic_federation(tmp_path, n_clients=0)
