"""Splitting one dataset among virtual clients: iid, Dirichlet label skew, or by a key."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data import load_jsonl
from fedtune.errors import InvalidInput


def _records(path: Path) -> list[dict[str, Any]]:
    load_jsonl(path)  # validates every line, naming the bad one
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _group(record: dict[str, Any], key: str | None) -> str:
    if key is not None:
        if key not in record:
            raise InvalidInput(f"partition key {key!r} is missing from a record ({sorted(record)})")
        return str(record[key])
    # Without a key, a record's group is the first word of its prompt ("reverse:", "add:", ...).
    text = record.get("prompt") or record.get("text") or ""
    return text.split()[0] if text.split() else ""


def partition(path: Path, n: int, scheme: str, seed: int = 0) -> list[list[dict[str, Any]]]:
    """Splits the records of a JSONL file among ``n`` clients.

    Schemes: ``iid`` (shuffled, equal shares); ``dirichlet:ALPHA`` (per group, client shares drawn
    from Dirichlet(ALPHA): small ALPHA, strong skew; the group is the ``label`` field if records
    have one, else the first word of the prompt); ``by-key:FIELD`` (one group per distinct value of
    FIELD, groups dealt round-robin to clients).

    Raises:
        InvalidInput: an unknown scheme, or more clients than the data can feed (a client would
            get no example).
    """
    records = _records(path)
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
            groups[_group(r, label)].append(r)
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
            groups[_group(r, key)].append(r)
        if len(groups) < n:
            raise InvalidInput(f"partition {scheme!r} gives {len(groups)} groups, fewer than the {n} clients")
        for i, name in enumerate(sorted(groups)):
            shares[i % n].extend(groups[name])
    else:
        raise InvalidInput(f"unknown partition {scheme!r}: use iid, dirichlet:ALPHA or by-key:FIELD")
    return shares


def write_partitions(shares: list[list[dict[str, Any]]], out: Path) -> list[Path]:
    """Writes each client's share as its private JSONL file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, share in enumerate(shares):
        p = out / f"client-{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in share), encoding="utf-8")
        paths.append(p)
    return paths
