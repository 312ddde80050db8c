"""Splitting one dataset among virtual clients: iid, Dirichlet label skew, or by a key."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.data import load_data
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from fedtune.spec import DataSpec


def _records(path: Path, data_spec: DataSpec | Mapping[str, Any] | None) -> list[dict[str, Any]]:
    loaded = load_data(path, data_spec)  # validates every record, naming the bad one
    return [dict(record) for record in loaded.source.records]


def _group(record: dict[str, Any], key: str | None, columns: Mapping[str, str]) -> str:
    if key is not None:
        if key not in record:
            raise InvalidInput(f"partition key {key!r} is missing from a record ({sorted(record)})")
        return str(record[key])
    # Without a key, a record's group is the first word of its prompt ("reverse:", "add:", ...), or
    # of a conversation's first user turn.
    text = _first_text(record, columns)
    return text.split()[0] if text.split() else ""


def _first_text(record: dict[str, Any], columns: Mapping[str, str]) -> str:
    for part in ("prompt", "text", "instruction"):
        if isinstance(record.get(columns[part]), str) and record[columns[part]]:
            return str(record[columns[part]])
    turns = record.get(columns["messages"]) or record.get(columns["conversations"]) or []
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict) and (turn.get("role") or turn.get("from")) in ("user", "human"):
            return str(turn.get("content") or turn.get("value") or "")
    return ""


def partition(path: Path, n: int, scheme: str, seed: int = 0,
              data_spec: DataSpec | Mapping[str, Any] | None = None) -> list[list[dict[str, Any]]]:
    """Splits the records of a data file (any format `fedtune.data.load_data` reads) among ``n`` clients.

    Schemes: ``iid`` (shuffled, equal shares); ``dirichlet:ALPHA`` (per group, client shares drawn
    from Dirichlet(ALPHA): small ALPHA, strong skew; the group is the ``label`` field if records
    have one, else the first word of the prompt); ``by-key:FIELD`` (one group per distinct value of
    FIELD, groups dealt round-robin to clients). ``data_spec``: the job's data settings, whose
    column names the records are validated under (`write_partitions` writes shares as JSONL).

    Raises:
        InvalidInput: an unknown scheme, or more clients than the data can feed (a client would
            get no example).
    """
    records = _records(path, data_spec)
    columns = _columns(data_spec)
    rng = random.Random(seed)
    if n < 1:
        raise InvalidInput(f"--clients must be at least 1, got {n}")
    if n > len(records):
        raise InvalidInput(f"{n} clients but {path} has only {len(records)} examples: every client needs one")
    shares: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    if scheme == "iid":
        rng.shuffle(records)
        for i, r in enumerate(records):
            shares[i % n].append(r)
    elif scheme.startswith("dirichlet:"):
        try:
            alpha = float(scheme.split(":", 1)[1])
        except ValueError:
            raise InvalidInput(f"partition {scheme!r}: ALPHA must be a number") from None
        if alpha <= 0:
            raise InvalidInput(f"partition {scheme!r}: ALPHA must be positive")
        label = "label" if all("label" in r for r in records) else None
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            groups[_group(r, label, columns)].append(r)
        np_rng = np.random.default_rng(seed)
        for members in groups.values():
            rng.shuffle(members)
            cuts = (np.cumsum(np_rng.dirichlet([alpha] * n)) * len(members)).astype(int)[:-1]
            for i, part in enumerate(np.split(np.arange(len(members)), cuts)):
                shares[i].extend(members[j] for j in part)
        # Dirichlet can leave a client empty: give it one example from the largest share.
        for share in shares:
            if not share:
                share.append(max(shares, key=len).pop())
    elif scheme.startswith("by-key:"):
        key = scheme.split(":", 1)[1]
        groups = defaultdict(list)
        for r in records:
            groups[_group(r, key, columns)].append(r)
        if len(groups) < n:
            raise InvalidInput(f"partition {scheme!r} gives {len(groups)} groups, fewer than the {n} clients")
        for i, name in enumerate(sorted(groups)):
            shares[i % n].extend(groups[name])
    else:
        raise InvalidInput(f"unknown partition {scheme!r}: use iid, dirichlet:ALPHA or by-key:FIELD")
    return shares


def _columns(data_spec: DataSpec | Mapping[str, Any] | None) -> dict[str, str]:
    from fedtune.data.schemas import DEFAULT_COLUMNS, as_data_spec

    return as_data_spec(data_spec).columns() if data_spec is not None else dict(DEFAULT_COLUMNS)


def write_partitions(shares: list[list[dict[str, Any]]], out: Path) -> list[Path]:
    """Writes each client's share as its private JSONL file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, share in enumerate(shares):
        p = out / f"client-{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in share), encoding="utf-8")
        paths.append(p)
    return paths
