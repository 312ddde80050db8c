"""What a record means: its schema, found from its keys, and its validation.

Schemas, by the keys of a record (after the job spec's column mapping, `DataSpec.columns()`):

- `{prompt, response}`: a pair; the loss covers the response.
- `{text}`: plain text; the loss covers every token.
- alpaca `{instruction, input, output}` (`input` may be missing, null or empty): a pair whose
  prompt is the Stanford Alpaca prompt (`alpaca_prompt`) and whose response is `output`.
- chat `{messages: [{role, content}, ...]}`, roles system, user, assistant.
- ShareGPT `{conversations: [{from, value}, ...]}`, from system, human (or user), gpt (or assistant).
- multiple choice `{prompt, choices: [str, ...], answer}`, `answer` the right option's index (from
  0) or its text: a pair whose response is the right option, for training and the loss, and a
  question whose options `fedtune.metrics` scores (`choice_accuracy`). `choices` and `answer`
  keep their names whatever the column mapping; a CSV cell holds `choices` as a JSON array.

Conversations have an optional system turn first, then user and assistant turns alternating, the
last one the assistant's. A file may mix schemas record by record. Every record is checked before
anything is returned, and a bad one is named by file and line (JSONL) or row.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.data.examples import Chat, Choice, Example
from fedtune.data.formats import DataFile, json_type, read_records
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from fedtune.spec import DataSpec

logger = logging.getLogger(__name__)

SCHEMAS = ("prompt/response", "text", "alpaca", "chat", "sharegpt", "choice")
_PARTS = ("prompt", "response", "text", "instruction", "input", "output", "messages", "conversations")
DEFAULT_COLUMNS = {part: part for part in _PARTS}
# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The keys of a multiple-choice record besides its prompt (not renamed by the column mapping).
CHOICES, ANSWER = "choices", "answer"
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}


class LoadedData(list[Example | Chat]):
    """The examples of one data file, in file order, with the file they were read from (a
    multiple-choice question is a `Choice`, an `Example` too).

    Attributes:
        source: The file's records (so `tokenize` can read them again under a job's column names).
        columns: The column names they were read under.
        schemas: How many records had each schema.
    """

    def __init__(self, items: Iterable[Example | Chat], source: DataFile, columns: dict[str, str],
                 schemas: Counter[str]) -> None:
        super().__init__(items)
        self.source = source
        self.columns = columns
        self.schemas = schemas


def as_data_spec(data: DataSpec | Mapping[str, Any] | None) -> DataSpec:
    """A job spec's data settings from a `DataSpec`, its dict (as a task carries it) or None (defaults).

    Raises:
        InvalidInput: The dict is not a valid `data:` section.
    """
    from pydantic import ValidationError

    from fedtune.spec import DataSpec

    if isinstance(data, DataSpec):
        return data
    try:
        return DataSpec.model_validate(dict(data or {}))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"job spec: data.{loc}: {first['msg']}") from e


def alpaca_prompt(instruction: str, input: str | None) -> str:
    """The Stanford Alpaca prompt of an instruction (and its input, when not empty)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def parse_records(data: DataFile, data_spec: DataSpec | Mapping[str, Any] | None = None) -> LoadedData:
    """Turns a file's records into examples, checking every one.

    Args:
        data: From `read_records`.
        data_spec: The job's data settings (their column names); None: the schemas' own names.

    Returns:
        The examples, in file order.

    Raises:
        InvalidInput: A record fits no schema (its keys are named) or is bad for its schema,
            named by file and line or row.
    """
    columns = as_data_spec(data_spec).columns() if data_spec is not None else dict(DEFAULT_COLUMNS)
    items: list[Example | Chat] = []
    schemas: Counter[str] = Counter()
    # Parquet and datasets hold every struct field in every turn: a null one is not there.
    columnar = data.format in ("parquet", "datasets")
    for index, record in enumerate(data.records):
        where = data.where(index)
        schema = detect_schema(record, columns)
        if schema is None:
            raise InvalidInput(f"{where}: {_unknown(record, columns)}")
        try:
            items.append(_parse(schema, record, columns, where, columnar))
        except _Bad as e:
            raise InvalidInput(f"{where}: {e}") from None
        schemas[schema] += 1
    return LoadedData(items, data, columns, schemas)


def detect_schema(record: Mapping[str, Any], columns: Mapping[str, str]) -> str | None:
    """The schema a record's keys point to (one of `SCHEMAS`), or None when they point to none.

    A record with a key of a schema is taken to be of that schema; `parse_records` then names
    any key it lacks or has in excess. An empty record is taken to be a pair missing both keys.
    """
    keys = set(record)
    if columns["messages"] in keys:
        return "chat"
    if columns["conversations"] in keys:
        return "sharegpt"
    if columns["instruction"] in keys or columns["output"] in keys:
        return "alpaca"
    if CHOICES in keys or (ANSWER in keys and columns["prompt"] in keys and columns["response"] not in keys):
        return "choice"
    if columns["text"] in keys:
        return "text"
    if columns["prompt"] in keys or columns["response"] in keys or not keys:
        return "prompt/response"
    return None


def load_data(path: Path, data_spec: DataSpec | Mapping[str, Any] | None = None,
              format: str | None = None) -> LoadedData:
    """Reads and validates a whole data file, in any format and schema fedtune reads.

    Nothing is returned unless every record is valid, so a client never trains on half a file.

    Args:
        path: A JSONL, JSON, CSV or parquet file, or a directory saved by `datasets`.
        data_spec: The job's data settings (`DataSpec` or its dict); None: defaults.
        format: One of `fedtune.data.FORMATS`; None: told from the file.

    Returns:
        The examples (`Example` for pairs, text and alpaca; `Chat` for conversations; `Choice`
        for multiple-choice questions), in order.

    Raises:
        InvalidInput: Naming the file, and the line or row of a bad record.
    """
    return parse_records(read_records(path, format), data_spec)


def load_jsonl(path: Path) -> LoadedData:
    """Reads and validates a whole JSONL data file (`load_data` with the format forced to JSONL).

    Blank lines are skipped; every other line must be a JSON object of one of the schemas.

    Raises:
        InvalidInput: The file is missing or empty, or a line is bad (`<path>:<line>: <problem>`).
    """
    return load_data(path, format="jsonl")


def read_data(path: Path, format: str | None = None) -> DataFile:
    """Reads a data file and checks as much as can be checked before the job's settings are known.

    What a client does before it joins: the whole file is read in its format; when every record's
    keys fit a schema under the schemas' own names, every record is validated too. When some do
    not, they may be named by the job's column mapping: `tokenize` validates them under it.

    Raises:
        InvalidInput: As `load_data`.
    """
    data = read_records(path, format)
    if all(detect_schema(r, DEFAULT_COLUMNS) is not None for r in data.records):
        parse_records(data)
    else:
        logger.info("%s: records with keys of no schema; checked under the job's column names later", path)
    return data


class _Bad(Exception):
    """A record's problem, before its place is added."""


def _unknown(record: Mapping[str, Any], columns: Mapping[str, str]) -> str:
    c = columns
    expected = (f"{{{c['prompt']}, {c['response']}}}, {{{c['text']}}}, "
                f"{{{c['instruction']}, {c['input']}, {c['output']}}}, {{{c['messages']}}}, {{{c['conversations']}}} "
                f"or {{{c['prompt']}, {CHOICES}, {ANSWER}}}")
    return (f"cannot detect the schema from the keys found ({', '.join(map(repr, sorted(record)))}); expected "
            f"{expected}, or name your columns in the job spec's data: section")


def _parse(schema: str, record: Mapping[str, Any], columns: Mapping[str, str], where: str,
           columnar: bool) -> Example | Chat:
    c = columns
    if schema == "prompt/response":
        _keys(record, {c["prompt"], c["response"]}, set(), schema)
        prompt, response = _string(record, c["prompt"]), _string(record, c["response"], nonempty=True)
        return Example(prompt=prompt, response=response)
    if schema == "text":
        _keys(record, {c["text"]}, set(), schema)
        return Example(prompt="", response=_string(record, c["text"], nonempty=True))
    if schema == "alpaca":
        _keys(record, {c["instruction"], c["output"]}, {c["input"]}, schema)
        instruction = _string(record, c["instruction"], nonempty=True)
        extra = record.get(c["input"])
        if extra is not None and not isinstance(extra, str):
            raise _Bad(f"{c['input']!r} must be a string, got {json_type(extra)}")
        return Example(prompt=alpaca_prompt(instruction, extra), response=_string(record, c["output"], nonempty=True))
    if schema == "choice":
        _keys(record, {c["prompt"], CHOICES, ANSWER}, set(), schema)
        choices = _choices(record[CHOICES])
        return Choice.of(_string(record, c["prompt"]), choices, _answer(record[ANSWER], choices), where)
    key = c["messages"] if schema == "chat" else c["conversations"]
    _keys(record, {key}, set(), schema)
    turns = record[key]
    if isinstance(turns, str):
        # A CSV cell (or a string column) holds the turns as a JSON array.
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise _Bad(f"{key!r} is not a JSON array of turns: {e.msg} at column {e.colno}") from None
    if schema == "chat":
        roles = {r: r for r in ("system", "user", "assistant")}
        return Chat(_turns(turns, key, "role", "content", roles, columnar), where)
    return Chat(_turns(turns, key, "from", "value", _SHAREGPT_ROLES, columnar), where)


def _keys(record: Mapping[str, Any], required: set[str], optional: set[str], schema: str) -> None:
    allowed = required | optional
    unknown = sorted(set(record) - allowed)
    shape = ", ".join(map(repr, sorted(required))) + (f" (and {', '.join(map(repr, sorted(optional)))})"
                                                      if optional else "")
    if unknown:
        raise _Bad(f"unexpected key(s) {', '.join(map(repr, unknown))}; a {schema} record has {shape}")
    missing = sorted(required - set(record))
    if missing:
        raise _Bad(f"missing key(s) {', '.join(map(repr, missing))} of a {schema} record")


def _string(record: Mapping[str, Any], key: str, nonempty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(f"{key!r} must be a string, got {json_type(value)}")
    # An empty prompt is fine (plain continuation); an empty target has nothing to learn from.
    if nonempty and not value:
        raise _Bad(f"{key!r} is empty")
    return value


def _choices(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        # A CSV cell (or a string column) holds the options as a JSON array.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _Bad(f"{CHOICES!r} must be an array of options (a JSON array in a CSV cell), got a string: "
                       f"{e.msg} at column {e.colno}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = json_type(value) if not isinstance(value, list) else "an array with " + ", ".join(
            sorted({json_type(v) for v in value if not isinstance(v, str)}))
        raise _Bad(f"{CHOICES!r} must be an array of strings, got {got}")
    if len(value) < 2:
        raise _Bad(f"{CHOICES!r} has {len(value)} option{'' if len(value) == 1 else 's'}; a question needs at "
                   "least 2")
    for n, option in enumerate(value):
        if not option.strip():
            raise _Bad(f"{CHOICES!r}: option {n} is empty")
        if option in value[:n]:
            raise _Bad(f"{CHOICES!r}: option {n} repeats option {value.index(option)} ({option!r})")
    return tuple(value)


def _answer(value: Any, choices: tuple[str, ...]) -> int:
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        # CSV cells are text: an index written there reads as digits.
        if not value.strip().isdigit():
            raise _Bad(f"{ANSWER!r} {value!r} is none of the {len(choices)} options; give the right option's "
                       "index (from 0) or its exact text")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{ANSWER!r} must be an option's index (from 0) or its text, got {json_type(value)}")
    if not 0 <= value < len(choices):
        raise _Bad(f"{ANSWER!r} {value} is out of range for {len(choices)} options (0 to {len(choices) - 1})")
    return value


def _turns(turns: Any, key: str, role_key: str, content_key: str, roles: Mapping[str, str],
           columnar: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(turns, list) or not turns:
        got = "an empty array" if isinstance(turns, list) else json_type(turns)
        raise _Bad(f"{key!r} must be a non-empty array of turns, got {got}")
    out: list[tuple[str, str]] = []
    for n, turn in enumerate(turns, start=1):
        if isinstance(turn, Mapping) and columnar:
            turn = {k: v for k, v in turn.items() if v is not None}
        if not isinstance(turn, Mapping) or set(turn) != {role_key, content_key}:
            shape = f"an object of keys {', '.join(map(repr, sorted(turn)))}" if isinstance(turn, Mapping) else (
                json_type(turn))
            raise _Bad(f"turn {n}: expected an object with {role_key!r} and {content_key!r}, got {shape}")
        role, content = turn[role_key], turn[content_key]
        if role not in roles:
            raise _Bad(f"turn {n}: unknown {role_key} {role!r}; expected one of {', '.join(map(repr, roles))}")
        if not isinstance(content, str):
            raise _Bad(f"turn {n}: {content_key!r} must be a string, got {json_type(content)}")
        out.append((roles[role], content))
    _check_roles(out)
    return tuple(out)


def _check_roles(turns: list[tuple[str, str]]) -> None:
    start = 1 if turns[0][0] == "system" else 0
    for n, (role, content) in enumerate(turns[start:], start=start + 1):
        expected = "user" if (n - start) % 2 == 1 else "assistant"
        if role != expected:
            where = "a system turn only comes first" if role == "system" else (
                "after an optional system turn, roles must alternate user, assistant")
            raise _Bad(f"turn {n}: role {role!r} where {expected!r} was expected; {where}")
        if role == "assistant" and not content:
            raise _Bad(f"turn {n}: the assistant's content is empty")
    if all(role != "assistant" for role, _ in turns):
        raise _Bad("no assistant turn: a conversation needs one to learn from")
    if turns[-1][0] != "assistant":
        raise _Bad(f"ends with a {turns[-1][0]} turn: the last turn must be the assistant's")
