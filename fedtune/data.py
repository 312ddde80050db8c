"""Client training data: JSONL loading and validation, tokenization with prompt masking, batching.

A data file holds one JSON object per line, either `{"prompt": ..., "response": ...}` (loss on the
response only) or `{"text": ...}` (loss on every token). `write_synthetic_federation` writes
non-IID demo data that a tiny character-level model learns within a few dozen steps.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Label value that torch's cross entropy (and Hugging Face causal LM losses) skip.
IGNORE_INDEX = -100

_PAIR_KEYS = frozenset({"prompt", "response"})
_TEXT_KEYS = frozenset({"text"})


@dataclass(frozen=True)
class Example:
    """One training example; the loss covers `response` only.

    A `{"text": ...}` line becomes an example with an empty prompt, so every token counts.
    """

    prompt: str
    response: str


def load_jsonl(path: Path) -> list[Example]:
    """Reads and validates a whole JSONL data file.

    Every line must be a JSON object with string `prompt` and non-empty string `response`, or with
    a non-empty string `text`, and no other keys. Blank lines are skipped. Nothing is returned
    unless the whole file is valid, so a client never trains on half a file.

    Args:
        path: The file.

    Returns:
        The examples, in file order.

    Raises:
        InvalidInput: The file is missing or empty, or a line is bad (`<path>:<line>: <problem>`).
    """
    if not path.exists():
        raise InvalidInput(f"{path}: no such data file")
    if not path.is_file():
        raise InvalidInput(f"{path}: not a regular file")
    examples: list[Example] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: editors on Windows often start files with a BOM.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}") from e
            problem = _record_problem(record)
            if problem:
                raise InvalidInput(f"{path}:{lineno}: {problem}")
            if "text" in record:
                examples.append(Example(prompt="", response=record["text"]))
            else:
                examples.append(Example(prompt=record["prompt"], response=record["response"]))
    if not examples:
        raise InvalidInput(f"{path}: data file has no examples")
    return examples


def _record_problem(record: Any) -> str | None:
    """Says what is wrong with one parsed line, or None when it is a valid example."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    keys = set(record)
    shape = _TEXT_KEYS if "text" in keys else _PAIR_KEYS
    unknown = sorted(keys - shape)
    if unknown:
        return (
            f"unexpected key(s) {', '.join(map(repr, unknown))}; "
            "a line has either 'prompt' and 'response', or 'text'"
        )
    missing = sorted(shape - keys)
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}"
    for key in sorted(shape):
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {_json_type(record[key])}"
    # An empty prompt is fine (plain continuation); an empty target has nothing to learn from.
    target = "text" if shape is _TEXT_KEYS else "response"
    if not record[target]:
        return f"{target!r} is empty"
    return None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def tokenize(examples: Sequence[Example], tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Turns examples into token ids and labels that train on the response only.

    Each sequence is `bos + prompt + response + eos` (bos/eos left out where the tokenizer has
    none), with labels equal to the ids on response and eos tokens and `IGNORE_INDEX` elsewhere.
    Prompt and response are tokenized separately so the boundary is exact for any tokenizer.
    Sequences are cut to `max_seq_len` tokens; an example whose response is cut away entirely is
    dropped (it would add no loss, and a batch made only of such examples has a 0/0 loss).

    Args:
        examples: From `load_jsonl` or `write_synthetic_federation`.
        tokenizer: A Hugging Face tokenizer.
        max_seq_len: Longest sequence kept, in tokens.

    Returns:
        One `{"input_ids": [...], "labels": [...]}` per kept example, in order.

    Raises:
        InvalidInput: `max_seq_len` is below 2, or no example keeps a response token.
    """
    if max_seq_len < 2:
        raise InvalidInput(f"max_seq_len must be at least 2, got {max_seq_len}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[dict[str, list[int]]] = []
    for example in examples:
        prompt_ids = bos + _encode(tokenizer, example.prompt)
        response_ids = _encode(tokenizer, example.response) + eos
        input_ids = (prompt_ids + response_ids)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    dropped = len(examples) - len(out)
    if dropped:
        logger.warning(
            "dropped %d of %d examples: prompt fills max_seq_len=%d", dropped, len(examples), max_seq_len
        )
    if examples and not out:
        raise InvalidInput(f"no example has a response token within max_seq_len={max_seq_len}")
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    # bos/eos are placed by tokenize itself, once per sequence.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads tokenized examples into a batch.

    Args:
        batch: Items from `tokenize`.
        pad_id: Token id written into padded positions (masked out of attention and loss).

    Returns:
        `input_ids`, `attention_mask` and `labels`, each of shape (batch, longest sequence).
    """
    import torch

    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# Short character-level tasks: distinct enough that a client's mix is visible in its losses, easy
# enough that a randomly initialised 2-layer model picks them up in tens of steps.
_LETTERS = "abcdefgh"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))


def _reverse(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"reverse: {w} ->", response=f" {w[::-1]}")


def _upper(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"upper: {w} ->", response=f" {w.upper()}")


def _sort(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"sort: {w} ->", response=f" {''.join(sorted(w))}")


def _copy(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"copy: {w} ->", response=f" {w}")


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return Example(prompt=f"add: {a}+{b} =", response=f" {a + b}")


_TASKS: tuple[Callable[[random.Random], Example], ...] = (_reverse, _upper, _sort, _copy, _add)
# Share of a client's examples drawn from its own task; the rest come from the other tasks.
_MAIN_TASK_SHARE = 0.8


def write_synthetic_federation(
    out_dir: Path,
    n_clients: int,
    examples_per_client: int = 64,
    eval_examples: int = 64,
    seed: int = 0,
) -> tuple[list[Path], Path]:
    """Writes non-IID prompt/response data for demo clients and a held-out eval set.

    Client `i` draws about 80% of its examples from task `i % 5` (reverse, upper, sort, copy, add
    on short strings) and the rest from the other tasks, so clients' data differ as in a real
    federation. The eval set cycles through all tasks evenly. Output depends only on the arguments.

    Args:
        out_dir: Directory to write `client_<i>.jsonl` and `eval.jsonl` into (created if missing).
        n_clients: Number of client files.
        examples_per_client: Lines per client file.
        eval_examples: Lines in the eval file.
        seed: Seed for all draws.

    Returns:
        The client files in client order, and the eval file.

    Raises:
        InvalidInput: A count is not positive.
    """
    for name, value in (
        ("n_clients", n_clients),
        ("examples_per_client", examples_per_client),
        ("eval_examples", eval_examples),
    ):
        if value < 1:
            raise InvalidInput(f"{name} must be at least 1, got {value}")
    out_dir.mkdir(parents=True, exist_ok=True)
    client_paths: list[Path] = []
    for client in range(n_clients):
        # String seeds hash the same in every process, unlike hash() of a tuple.
        rng = random.Random(f"fedtune-synthetic:{seed}:client:{client}")
        main = client % len(_TASKS)
        others = [t for t in range(len(_TASKS)) if t != main]
        examples = []
        for _ in range(examples_per_client):
            task = main if rng.random() < _MAIN_TASK_SHARE else rng.choice(others)
            examples.append(_TASKS[task](rng))
        client_paths.append(_write_jsonl(out_dir / f"client_{client}.jsonl", examples))
    rng = random.Random(f"fedtune-synthetic:{seed}:eval")
    eval_set = [_TASKS[i % len(_TASKS)](rng) for i in range(eval_examples)]
    return client_paths, _write_jsonl(out_dir / "eval.jsonl", eval_set)


def _write_jsonl(path: Path, examples: Sequence[Example]) -> Path:
    lines = [json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples]
    path.write_text("".join(lines), encoding="utf-8")
    return path
