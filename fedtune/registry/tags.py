"""Tags on published rounds (``production``, ``staging``): one durable row per (job, tag).

A tag names one published round of one job; moving it to an earlier round is a rollback. The
table lives in the coordinator's SQLite database (created with its schema, see
:mod:`fedtune.coordinator.state`); writes run inside the database's own transactions, so a tag and
the rounds it points at are checked and changed together, and a refused request changes nothing.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from fedtune.errors import InvalidInput, NotFound

TAGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter_tags (
  job_id TEXT NOT NULL, tag TEXT NOT NULL, round INTEGER NOT NULL, updated REAL NOT NULL,
  PRIMARY KEY (job_id, tag));
"""

# The pseudo-tag every job has: its highest published round. It cannot be set by hand.
LATEST = "latest"
# Starts with a letter, so that JOB@3 is always a round and JOB@v3 always a tag.
_TAG_RE = re.compile(r"[a-z][a-z0-9._-]{0,62}")

Transaction = Callable[[], AbstractContextManager[sqlite3.Connection]]


def check_tag_name(tag: str) -> str:
    """Returns ``tag`` when it may name a tag.

    Raises:
        InvalidInput: naming the rule it breaks.
    """
    if tag == LATEST:
        raise InvalidInput(f"tag {LATEST!r} is reserved: it always names a job's highest published round")
    if not _TAG_RE.fullmatch(tag):
        raise InvalidInput(f"bad tag name {tag!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                           "starting with a letter (e.g. production)")
    return tag


@dataclass(frozen=True)
class TagMove:
    """What a tag or untag did: the tag's round before and after (None: unset)."""

    job_id: str
    tag: str
    round: int | None
    previous: int | None


def tags_by_round(db: sqlite3.Connection, job_id: str | None = None) -> dict[tuple[str, int], tuple[str, ...]]:
    """{(job, round): its tags, sorted} for every tagged round (of one job, or all).

    An older database without the tags table has no tags.
    """
    try:
        if job_id:
            rows = db.execute("SELECT job_id, round, tag FROM adapter_tags WHERE job_id=? ORDER BY tag",
                              (job_id,)).fetchall()
        else:
            rows = db.execute("SELECT job_id, round, tag FROM adapter_tags ORDER BY tag").fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return {}
        raise
    out: dict[tuple[str, int], list[str]] = {}
    for job, rnd, tag in rows:
        out.setdefault((job, int(rnd)), []).append(tag)
    return {k: tuple(v) for k, v in out.items()}


class AdapterTags:
    """The tags table of one coordinator database, written in its transactions."""

    def __init__(self, tx: Transaction, lock: AbstractContextManager[Any], db: sqlite3.Connection) -> None:
        """``tx`` opens a write transaction; reads run on ``db`` holding ``lock`` (the state's own)."""
        self._tx = tx
        self._lock = lock
        self._db = db

    def set(self, job_id: str, rnd: int, tag: str) -> TagMove:
        """Points ``tag`` of ``job_id`` at published round ``rnd`` (creating or moving it).

        Raises:
            InvalidInput: a bad tag name or round number.
            NotFound: no such job, or round ``rnd`` is not published (yet, or ever).
        """
        check_tag_name(tag)
        if rnd < 1:
            raise InvalidInput(f"round {rnd} is not a round number: rounds count from 1")
        with self._tx() as db:
            _check_job(db, job_id)
            if db.execute("SELECT 1 FROM published WHERE job_id=? AND round=?", (job_id, rnd)).fetchone() is None:
                rounds = [r[0] for r in db.execute("SELECT round FROM published WHERE job_id=? ORDER BY round",
                                                   (job_id,))]
                have = f"published rounds: {_spans(rounds)}" if rounds else "nothing is published yet"
                raise NotFound(f"job {job_id} has no published round {rnd} to tag ({have})")
            prev = db.execute("SELECT round FROM adapter_tags WHERE job_id=? AND tag=?", (job_id, tag)).fetchone()
            db.execute("INSERT OR REPLACE INTO adapter_tags VALUES (?,?,?,?)", (job_id, tag, rnd, time.time()))
        return TagMove(job_id, tag, rnd, int(prev[0]) if prev else None)

    def by_round(self, job_id: str | None = None) -> dict[tuple[str, int], tuple[str, ...]]:
        """{(job, round): its tags} of one job, or of all."""
        with self._lock:
            return tags_by_round(self._db, job_id)

    def remove(self, job_id: str, tag: str) -> TagMove:
        """Removes ``tag`` from ``job_id``.

        Raises:
            NotFound: no such job, or the job has no such tag.
        """
        with self._tx() as db:
            _check_job(db, job_id)
            prev = db.execute("SELECT round FROM adapter_tags WHERE job_id=? AND tag=?", (job_id, tag)).fetchone()
            if prev is None:
                known = sorted({t for ts in tags_by_round(db, job_id).values() for t in ts})
                raise NotFound(f"job {job_id} has no tag {tag!r} (its tags: {', '.join(known) or 'none'})")
            db.execute("DELETE FROM adapter_tags WHERE job_id=? AND tag=?", (job_id, tag))
        return TagMove(job_id, tag, None, int(prev[0]))


def _check_job(db: sqlite3.Connection, job_id: str) -> None:
    if not job_id:
        raise InvalidInput("no job id given")
    if db.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone() is None:
        raise NotFound(f"no job {job_id!r}")


def _spans(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for r in rounds:
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
