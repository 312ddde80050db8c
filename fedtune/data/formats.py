"""Reading a data file's records: JSONL, JSON, CSV, parquet, or a directory saved by `datasets`.

The format comes from the file's suffix (`.jsonl`/`.ndjson`, `.json`, `.csv`, `.parquet`/`.pq`),
or, for a directory, from the files `datasets`' `save_to_disk` writes (`dataset_info.json`,
`state.json`, `dataset_dict.json`); a `format` argument overrides it. Only the container is read
here; what each record means is `fedtune.data.schemas`' business.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import InvalidInput

FORMATS = ("jsonl", "json", "csv", "parquet", "datasets")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
             ".pq": "parquet"}
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_INSTALL = "pip install 'fedtune[data]'"


@dataclass(frozen=True)
class DataFile:
    """The records of one data file, each with the place it was read from.

    Attributes:
        path: The file (or saved `datasets` directory).
        format: One of `FORMATS`.
        records: One mapping per record, in file order.
        numbers: Each record's line (JSONL) or 1-based row / record number.
        unit: What `numbers` count: "line" (JSONL), "record" (JSON), "row" (CSV rows after the
            header, parquet and `datasets` rows).
        note: Anything worth telling about how the file was read (e.g. the split taken).
    """

    path: Path
    format: str
    records: tuple[dict[str, Any], ...]
    numbers: tuple[int, ...]
    unit: str
    note: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        """`file:line` for JSONL, `file: row N` (or `record N`) otherwise, of record `index`."""
        return _where(self.path, self.unit, self.numbers[index])


def _where(path: Path, unit: str, number: int) -> str:
    return f"{path}:{number}" if unit == "line" else f"{path}: {unit} {number}"


def detect_format(path: Path) -> str:
    """Tells a data file's format from its suffix, or a directory's from what `save_to_disk` writes.

    Raises:
        InvalidInput: The path is missing, or its format cannot be told.
    """
    if not path.exists():
        raise InvalidInput(f"{path}: no such data file")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASETS_MARKERS):
            return "datasets"
        raise InvalidInput(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk "
                           f"(none of {', '.join(_DATASETS_MARKERS)} in it)")
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise InvalidInput(f"{path}: cannot tell the data format from the suffix {path.suffix or '(none)'!r}; "
                           f"name it .jsonl, .json, .csv or .parquet, or give the format ({', '.join(FORMATS)})")
    return found


def read_records(path: Path, format: str | None = None) -> DataFile:
    """Reads every record of a data file; nothing is returned unless the whole file reads.

    Args:
        path: A file, or a directory saved with `datasets.Dataset.save_to_disk` (of a
            `DatasetDict`, the `train` split is read).
        format: One of `FORMATS`; None detects it (see `detect_format`).

    Returns:
        The records and where each was read.

    Raises:
        InvalidInput: The file is missing, unreadable in its format, holds a record that is not an
            object, or holds no record; or the library its format needs is not installed.
    """
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise InvalidInput(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise InvalidInput(f"{path}: no such data file")
    if format != "datasets" and not path.is_file():
        raise InvalidInput(f"{path}: not a regular file")
    note = ""
    if format == "jsonl":
        unit, rows = "line", list(_jsonl(path))
    elif format == "json":
        unit, rows = "record", _json(path)
    elif format == "csv":
        unit, rows = "row", _csv(path)
    elif format == "parquet":
        unit, rows = "row", _parquet(path)
    else:
        unit, (rows, note) = "row", _saved_dataset(path)
    for number, record in rows:
        if not isinstance(record, dict):
            kind = "an object" if unit != "row" else "a mapping"
            raise InvalidInput(f"{_where(path, unit, number)}: expected {kind}, got {json_type(record)}")
    if not rows:
        raise InvalidInput(f"{path}: data file has no examples")
    return DataFile(path, format, tuple(r for _, r in rows), tuple(n for n, _ in rows), unit, note)


def json_type(value: Any) -> str:
    """A value's JSON type name, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: editors on Windows often start files with a BOM.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from e
            # Without its line ending: a record cut short would otherwise be reported one column
            # past its end, or at column 1 of the next line.
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                where = f"the end of the line (column {e.colno})" if e.pos >= len(line) else f"column {e.colno}"
                raise InvalidInput(f"{path}:{lineno}: not valid JSON: {e.msg} at {where}") from e
            if not isinstance(record, dict):
                raise InvalidInput(f"{path}:{lineno}: expected a JSON object, got {json_type(record)}")
            yield lineno, record


def _json(path: Path) -> list[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; one object per line is JSON Lines: name the file .jsonl or give the format jsonl"
                if e.msg == "Extra data" else "")
        raise InvalidInput(f"{path}:{e.lineno}: not valid JSON: {e.msg} at column {e.colno}{hint}") from e
    if isinstance(data, dict):
        # {"data": [...]}, {"train": [...]}, SQuAD-style {"version": ..., "data": [...]}.
        arrays = [key for key, value in data.items() if isinstance(value, list)]
        if len(arrays) != 1:
            raise InvalidInput(f"{path}: expected a JSON array of records, or an object with one key holding "
                               f"it; got an object with keys {', '.join(map(repr, sorted(data))) or '(none)'}")
        data = data[arrays[0]]
    if not isinstance(data, list):
        raise InvalidInput(f"{path}: expected a JSON array of records, got {json_type(data)}")
    return list(enumerate(data, start=1))


def _csv(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    # Long documents in one cell are normal in training data; the csv default (128 KiB) is not.
    limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                raise InvalidInput(f"{path}: the header names column(s) {', '.join(map(repr, duplicates))} twice")
            for number, row in enumerate(reader, start=1):
                if None in row or None in row.values():
                    extra = row.get(None)  # type: ignore[call-overload]
                    got = len(header) + len(extra) if extra else sum(v is not None for v in row.values())
                    raise InvalidInput(f"{path}: row {number}: has {got} fields, the header has {len(header)}")
                rows.append((number, dict(row)))
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}: row {len(rows) + 1}: not valid UTF-8 ({e.reason})") from e
    except csv.Error as e:
        raise InvalidInput(f"{path}: row {len(rows) + 1}: not valid CSV: {e}") from e
    finally:
        csv.field_size_limit(limit)
    return rows


def _parquet(path: Path) -> list[tuple[int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InvalidInput(f"reading parquet needs pyarrow: {_INSTALL}") from e
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"{path}: not a readable parquet file: {e}") from e
    return list(enumerate(map(_present, table.to_pylist()), start=1))


def _saved_dataset(path: Path) -> tuple[list[tuple[int, Any]], str]:
    try:
        import datasets
    except ImportError as e:
        raise InvalidInput(f"reading a saved dataset needs datasets: {_INSTALL}") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    # datasets raises FileNotFoundError for a bad layout, and arrow or JSON errors for bad files.
    except Exception as e:
        raise InvalidInput(f"{path}: not a dataset that datasets.load_from_disk reads: {e}") from e
    note = ""
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if "train" not in loaded:
            raise InvalidInput(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                               "save the split to train on")
        loaded, note = loaded["train"], f"the train split of a DatasetDict (splits: {', '.join(splits)})"
    if not isinstance(loaded, datasets.Dataset):
        raise InvalidInput(f"{path}: holds a {type(loaded).__name__}, not a Dataset or DatasetDict")
    return list(enumerate(map(_present, loaded.to_list()), start=1)), note


def _present(row: dict[str, Any]) -> dict[str, Any]:
    # A columnar file holds every column in every row: a null there is a key the record does not
    # have, as in a JSON file that mixes schemas.
    return {key: value for key, value in row.items() if value is not None}
