"""The adapter registry, read side: what a coordinator has published, its tags, and references.

A reference names one published round: ``JOB@ROUND`` (``job-1a2b3c4d@3``), ``JOB@TAG``
(``job-1a2b3c4d@production``), or ``JOB`` alone (its highest published round, also ``JOB@latest``).

:func:`list_published` and :func:`resolve` read a coordinator's state dir directly, through a
read-only SQLite connection (a WAL reader): they are safe while the coordinator runs and never
change its state. Through the admin API the same rows come from ``ListAdapters``; :func:`pick`
resolves a reference over either.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import InvalidInput, NotFound
from fedtune.registry.lineage import section
from fedtune.registry.tags import LATEST, tags_by_round

STATE_DB = "state.db"


@dataclass(frozen=True)
class PublishedAdapter:
    """One published round of one job.

    Attributes:
        job: The job id.
        round: The round number (from 1).
        path: Its adapter directory (``adapter_config.json``, ``adapter_model.safetensors``, ``fedtune.json``).
        tags: The tags pointing at it, sorted.
        base_model: The base model its manifest names.
        method: Its peft method (``lora``, ``ia3``, ...).
    """

    job: str
    round: int
    path: Path
    tags: tuple[str, ...]
    base_model: str = ""
    method: str = ""

    @property
    def ref(self) -> str:
        """``JOB@ROUND``: the reference that names this round whatever tags move."""
        return f"{self.job}@{self.round}"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a job and at most one of a round or a tag (neither: the latest)."""

    job: str
    round: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.round is not None:
            return f"{self.job}@{self.round}"
        return f"{self.job}@{self.tag}" if self.tag else self.job


def parse_ref(ref: str) -> Ref:
    """Parses ``JOB``, ``JOB@ROUND`` or ``JOB@TAG``.

    Raises:
        InvalidInput: an empty job or an empty or malformed part after ``@``.
    """
    job, at, rest = ref.strip().partition("@")
    if not job or (at and not rest) or "@" in rest:
        raise InvalidInput(f"bad adapter reference {ref!r}: use JOB, JOB@ROUND or JOB@TAG "
                           "(e.g. job-1a2b3c4d@production)")
    if not at or rest == LATEST:
        return Ref(job)
    if rest.isdigit():
        if int(rest) < 1:
            raise InvalidInput(f"bad adapter reference {ref!r}: rounds count from 1")
        return Ref(job, round=int(rest))
    return Ref(job, tag=rest)


def pick(adapters: Iterable[PublishedAdapter], ref: str | Ref, *, job_known: bool | None = None) -> PublishedAdapter:
    """The adapter ``ref`` names among ``adapters`` (one job's or every job's).

    Args:
        job_known: Whether the job exists even if none of its rounds is published (for the message).

    Raises:
        InvalidInput: a malformed reference.
        NotFound: naming the reference and what the job does have.
    """
    r = parse_ref(ref) if isinstance(ref, str) else ref
    rows = sorted((a for a in adapters if a.job == r.job), key=lambda a: a.round)
    if not rows:
        if job_known is False:
            raise NotFound(f"no job {r.job!r} (adapter reference {r})")
        raise NotFound(f"no published adapter {r}: job {r.job} has published nothing yet")
    if r.round is not None:
        found = [a for a in rows if a.round == r.round]
        if not found:
            raise NotFound(f"no published adapter {r}: job {r.job} has published rounds "
                           f"{', '.join(str(a.round) for a in rows)}")
        return found[0]
    if r.tag is not None:
        found = [a for a in rows if r.tag in a.tags]
        if not found:
            known = sorted({t for a in rows for t in a.tags})
            raise NotFound(f"no published adapter {r}: job {r.job} has no tag {r.tag!r} "
                           f"(its tags: {', '.join(known) or 'none'}; tag one with `fedtune adapters tag`)")
        return found[0]
    return rows[-1]


def _connect_readonly(state_dir: Path) -> sqlite3.Connection:
    db_path = state_dir / STATE_DB
    if not db_path.is_file():
        raise NotFound(f"{state_dir} holds no coordinator state (no {STATE_DB}): pass a coordinator's --state-dir")
    # mode=ro: a WAL reader that sees every committed transaction and can never write.
    db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def list_published(state_dir: Path, job: str | None = None) -> list[PublishedAdapter]:
    """Every round a coordinator has published (of one job, or all), by job then round, with its tags.

    Read-only and safe while the coordinator runs.

    Raises:
        NotFound: ``state_dir`` holds no coordinator database.
    """
    db = _connect_readonly(Path(state_dir))
    try:
        with db:
            if job:
                rows = db.execute("SELECT job_id, round, path, manifest_json FROM published WHERE job_id=? "
                                  "ORDER BY round", (job,)).fetchall()
            else:
                rows = db.execute("SELECT job_id, round, path, manifest_json FROM published "
                                  "ORDER BY job_id, round").fetchall()
            tags = tags_by_round(db, job)
    except sqlite3.DatabaseError as e:
        raise NotFound(f"cannot read the coordinator state in {state_dir}: {e}") from e
    finally:
        db.close()
    return [adapter_from_row(j, int(r), p, m, tags.get((j, int(r)), ())) for j, r, p, m in rows]


def adapter_from_row(job: str, rnd: int, path: str, manifest_json: str, tags: Iterable[str]) -> PublishedAdapter:
    """A :class:`PublishedAdapter` from a ``published`` row (or a ``ListAdapters`` entry)."""
    try:
        manifest = json.loads(manifest_json) if manifest_json else {}
    except json.JSONDecodeError:
        manifest = {}
    peft = section(manifest, "peft")
    return PublishedAdapter(job, rnd, Path(path), tuple(sorted(tags)), str(manifest.get("base_model", "")),
                            str(peft.get("method", "lora")) if manifest else "")


def resolve(state_dir: Path, ref: str) -> PublishedAdapter:
    """The published adapter ``ref`` (``JOB@ROUND``, ``JOB@TAG`` or ``JOB``) names in a coordinator's state dir.

    Read-only and safe while the coordinator runs; a tag moved since the last call resolves to its new round.

    Raises:
        InvalidInput: a malformed reference.
        NotFound: naming ``ref``: no such job, round or tag, or nothing published.
    """
    r = parse_ref(ref)
    adapters = list_published(state_dir, r.job)
    job_known = None
    if not adapters:
        db = _connect_readonly(Path(state_dir))
        try:
            job_known = db.execute("SELECT 1 FROM jobs WHERE job_id=?", (r.job,)).fetchone() is not None
        finally:
            db.close()
    return pick(adapters, r, job_known=job_known)


__all__ = ["PublishedAdapter", "Ref", "adapter_from_row", "list_published", "parse_ref", "pick", "resolve"]
