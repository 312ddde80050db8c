"""Durable coordinator state in SQLite (WAL, synchronous=FULL).

Every mutation is one transaction; a row written here is on disk when the call returns, which is
what lets the servicer acknowledge an update only after it is durable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedtune import STATE_FORMAT, __version__
from fedtune.errors import AuthError, NotFound, PreconditionFailed, StateConflict
from fedtune.registry.tags import TAGS_SCHEMA, AdapterTags

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_json TEXT NOT NULL, state TEXT NOT NULL,
  current_round INTEGER NOT NULL, base_model TEXT NOT NULL, base_hash TEXT NOT NULL,
  initial_adapter TEXT NOT NULL, peft_config_json TEXT NOT NULL, base_eval_json TEXT,
  message TEXT NOT NULL DEFAULT '', created REAL NOT NULL, privacy_json TEXT, emulator_dir TEXT);
CREATE TABLE IF NOT EXISTS job_files (
  job_id TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
  PRIMARY KEY (job_id, path));
CREATE TABLE IF NOT EXISTS tokens (
  token_hash TEXT PRIMARY KEY, job_id TEXT NOT NULL, uses_left INTEGER NOT NULL,
  expires REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
  client_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, name TEXT NOT NULL, token_hash TEXT NOT NULL,
  sign_public_key BLOB NOT NULL, kx_public_key BLOB NOT NULL, device TEXT NOT NULL, joined REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, opened REAL NOT NULL,
  deadline REAL NOT NULL, cohort_json TEXT NOT NULL, global_in TEXT NOT NULL, global_out TEXT,
  metrics_json TEXT, closed REAL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
  bytes_down INTEGER NOT NULL DEFAULT 0, UNIQUE (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS updates (
  update_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL,
  task_id TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, num_examples INTEGER NOT NULL,
  metrics_json TEXT NOT NULL, codec TEXT NOT NULL, received REAL NOT NULL,
  UNIQUE (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS secagg_rounds (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, params BLOB NOT NULL,
  members_json TEXT NOT NULL, phase TEXT NOT NULL, deadline REAL NOT NULL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS secagg_inbox (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, phase TEXT NOT NULL,
  sender INTEGER NOT NULL, payload BLOB NOT NULL, signature BLOB NOT NULL, received REAL NOT NULL,
  PRIMARY KEY (job_id, round, attempt, phase, sender));
CREATE TABLE IF NOT EXISTS secagg_outbox (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL, phase TEXT NOT NULL,
  receiver INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (job_id, round, attempt, phase, receiver));
CREATE TABLE IF NOT EXISTS job_runtime (
  job_id TEXT PRIMARY KEY, engine_restarts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS strategy_states (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS client_features (
  client_id TEXT PRIMARY KEY, features_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS client_evals (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL, num_examples INTEGER NOT NULL,
  metrics_json TEXT NOT NULL, received REAL NOT NULL, PRIMARY KEY (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS released_tasks (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL, reason TEXT NOT NULL,
  released REAL NOT NULL, PRIMARY KEY (job_id, round, client_id));
CREATE TABLE IF NOT EXISTS published (
  job_id TEXT NOT NULL, round INTEGER NOT NULL, path TEXT NOT NULL, manifest_json TEXT NOT NULL,
  PRIMARY KEY (job_id, round));
"""


TOKEN_ID_LEN = 12


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_id(token: str) -> str:
    """A token's non-secret handle: the start of its hash."""
    return _hash_secret(token)[:TOKEN_ID_LEN]


@dataclass(frozen=True)
class Job:
    """A job as stored."""

    job_id: str
    name: str
    spec_json: str
    state: str
    current_round: int
    base_model: str
    base_hash: str
    initial_adapter: str
    peft_config_json: str
    base_eval_json: str | None
    message: str
    created: float
    privacy_json: str | None = None
    emulator_dir: str | None = None


@dataclass(frozen=True)
class Round:
    """One round of a job."""

    job_id: str
    round: int
    state: str  # open, closing, published
    opened: float
    deadline: float
    cohort: tuple[str, ...]
    global_in: str
    global_out: str | None
    metrics: dict[str, float]
    closed: float | None


@dataclass(frozen=True)
class Update:
    """An accepted, durable client update."""

    update_id: str
    job_id: str
    round: int
    client_id: str
    task_id: str
    sha256: str
    size: int
    num_examples: int
    metrics: dict[str, float]
    codec: str
    received: float


@dataclass(frozen=True)
class Client:
    """An enrolled client agent."""

    client_id: str
    job_id: str
    name: str
    device: str
    joined: float
    sign_public_key: bytes = b""
    kx_public_key: bytes = b""


@dataclass(frozen=True)
class SecAggRound:
    """The current secure-aggregation attempt of a round."""

    job_id: str
    round: int
    attempt: int
    params: bytes
    members: tuple[str, ...]  # client id of each index
    phase: str  # advertise, share, mask, unmask, abandoned
    deadline: float


@dataclass(frozen=True)
class FileEntry:
    """One file of a job's base model directory."""

    path: str
    sha256: str
    size: int


@functools.lru_cache(maxsize=64)
def _cohort(cohort_json: str) -> tuple[str, ...]:
    """A round's cohort from its stored JSON, parsed once per distinct text: every poll reads its
    round, and a 2,000-member cohort is ~0.2 ms of JSON, paid by each of 2,000 clients asking as
    the round opens (the tuple is immutable, so sharing it is safe)."""
    return tuple(json.loads(cohort_json))


class CoordinatorState:
    """The coordinator's SQLite database. Thread-safe: one connection behind a lock."""

    def __init__(self, db_path: Path) -> None:
        self._lock = threading.RLock()
        # Enrolled clients by id, for the check every signed call makes: a client's row never
        # changes, only its token's revocation, which clears this (as does any commit by another
        # connection, seen through PRAGMA data_version).
        self._client_cache: dict[str, Client] = {}
        self._data_version = -1
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, which the update ack relies on.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._check_format()

    def _check_format(self) -> None:
        with self._tx() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key='state_format'").fetchone()
                found = int(row[0]) if row else None
                if found != STATE_FORMAT:
                    writer = db.execute("SELECT value FROM meta WHERE key='written_by'").fetchone()
                    raise StateConflict(
                        f"state dir was written by fedtune {writer[0] if writer else '?'} (state format "
                        f"{found}); this is fedtune {__version__} (state format {STATE_FORMAT}): "
                        "use a fresh --state-dir or the matching fedtune version"
                    )
            elif tables:
                raise StateConflict("state dir holds a database that is not a fedtune coordinator's")
        # executescript commits implicitly, so it runs outside the transaction helper.
        with self._lock:
            self._db.executescript(SCHEMA + TAGS_SCHEMA)  # the registry's tags: a table added, no format bump
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('state_format', ?), ('written_by', ?), ('coordinator_id', ?)",
                (str(STATE_FORMAT), __version__, uuid.uuid4().hex),
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- jobs
    def add_job(
        self,
        *,
        name: str,
        spec_json: str,
        base_model: str,
        base_hash: str,
        files: list[FileEntry],
        initial_adapter: str,
        peft_config_json: str,
        emulator_dir: str | None = None,
        state: str = "running",
    ) -> Job:
        """Creates a job at round 1 in ``state`` (``running``, or ``queued`` for a scheduler)."""
        job_id = "job-" + secrets.token_hex(4)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, name, spec_json, state, 1, base_model, base_hash, initial_adapter,
                 peft_config_json, None, "", now, None, emulator_dir),
            )
            db.executemany(
                "INSERT INTO job_files VALUES (?,?,?,?)",
                [(job_id, f.path, f.sha256, f.size) for f in files],
            )
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        """A job by id."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return Job(**dict(row))

    def jobs(self) -> list[Job]:
        """All jobs, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [Job(**dict(r)) for r in rows]

    def job_files(self, job_id: str) -> list[FileEntry]:
        """The base model files a job's clients download."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, sha256, size FROM job_files WHERE job_id=? ORDER BY path", (job_id,)
            ).fetchall()
        return [FileEntry(**dict(r)) for r in rows]

    def count_engine_restart(self, job_id: str) -> int:
        """Records that the job's engine was restarted after a crash; returns the new count."""
        with self._tx() as db:
            db.execute("INSERT INTO job_runtime VALUES (?, 1) ON CONFLICT(job_id) DO UPDATE SET "
                       "engine_restarts=engine_restarts+1", (job_id,))
            return int(db.execute("SELECT engine_restarts FROM job_runtime WHERE job_id=?", (job_id,)).fetchone()[0])

    def engine_restarts(self, job_id: str) -> int:
        """How many times the job's engine was restarted after a crash."""
        with self._lock:
            row = self._db.execute("SELECT engine_restarts FROM job_runtime WHERE job_id=?", (job_id,)).fetchone()
        return int(row[0]) if row else 0

    def set_job_state(self, job_id: str, state: str, message: str = "") -> None:
        """Moves a job to a new state (queued, running, finished, failed, cancelled)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, message=? WHERE job_id=?", (state, message, job_id))

    def set_base_eval(self, job_id: str, metrics: dict[str, float]) -> None:
        """Records the base model's eval metrics (the zero-shot reference)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET base_eval_json=? WHERE job_id=?", (json.dumps(metrics), job_id))

    def job_may_serve(self, job_id: str, sha256: str) -> bool:
        """Whether a blob belongs to a job (a base file or one of its adapters)."""
        with self._lock:
            db = self._db
            if db.execute("SELECT 1 FROM job_files WHERE job_id=? AND sha256=?", (job_id, sha256)).fetchone():
                return True
            if db.execute("SELECT 1 FROM jobs WHERE job_id=? AND initial_adapter=?", (job_id, sha256)).fetchone():
                return True
            if db.execute("SELECT 1 FROM strategy_states WHERE job_id=? AND sha256=?", (job_id, sha256)).fetchone():
                return True  # SCAFFOLD's server control variate, which clients fetch
            return db.execute(
                "SELECT 1 FROM rounds WHERE job_id=? AND global_out=?", (job_id, sha256)
            ).fetchone() is not None

    # ---------------------------------------------------------------- tokens and clients
    def add_token(self, job_id: str, uses: int, ttl_seconds: float) -> tuple[str, float, str]:
        """Creates an enrollment token; only its hash is stored. Returns (token, expiry, token id)."""
        self.job(job_id)
        token = "ftk_" + secrets.token_urlsafe(24)
        expires = time.time() + ttl_seconds
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?,?,?,?,0,?)",
                (_hash_secret(token), job_id, uses, expires, time.time()),
            )
        return token, expires, token_id(token)

    def revoke_token(self, token_or_id: str) -> tuple[str, int]:
        """Revokes a token given itself or its id. Returns (token id, clients enrolled with it)."""
        with self._tx() as db:
            rows = db.execute("SELECT token_hash FROM tokens").fetchall()
            wanted = _hash_secret(token_or_id)
            match = [r[0] for r in rows if r[0] == wanted or r[0][:TOKEN_ID_LEN] == token_or_id]
            if not match:
                raise NotFound("no such token (pass the token or the id printed by `token create --format json`)")
            db.execute("UPDATE tokens SET revoked=1 WHERE token_hash=?", (match[0],))
            self._client_cache.clear()
            n = db.execute("SELECT COUNT(*) FROM clients WHERE token_hash=?", (match[0],)).fetchone()[0]
        return match[0][:TOKEN_ID_LEN], int(n)

    def join(self, token: str, name: str, device: str, sign_public_key: bytes, kx_public_key: bytes,
             features: tuple[str, ...] = (), admit: Callable[[str], None] | None = None) -> Client:
        """Spends one use of a token and enrolls a client with its public keys and the features its
        agent runs. ``admit(job_id)`` may refuse the client (by raising) before anything changes."""
        client_id = "client-" + secrets.token_hex(4)
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM tokens WHERE token_hash=?", (_hash_secret(token),)).fetchone()
            if row is None:
                raise AuthError("enrollment token is not valid")
            if row["revoked"]:
                raise AuthError("enrollment token was revoked")
            if row["expires"] < now:
                raise AuthError("enrollment token has expired")
            if row["uses_left"] <= 0:
                raise AuthError("enrollment token has no uses left")
            job = db.execute("SELECT state FROM jobs WHERE job_id=?", (row["job_id"],)).fetchone()
            if job is None or job["state"] not in ("running", "queued"):
                raise PreconditionFailed(f"job {row['job_id']} is not running")
            if db.execute("SELECT 1 FROM clients WHERE sign_public_key=?", (sign_public_key,)).fetchone():
                raise PreconditionFailed("this client key is already enrolled; reuse its identity")
            if admit is not None:
                admit(row["job_id"])
            db.execute("INSERT INTO client_features VALUES (?,?)", (client_id, json.dumps(sorted(features))))
            db.execute("UPDATE tokens SET uses_left=uses_left-1 WHERE token_hash=?", (row["token_hash"],))
            db.execute(
                "INSERT INTO clients VALUES (?,?,?,?,?,?,?,?)",
                (client_id, row["job_id"], name[:128], row["token_hash"], sign_public_key, kx_public_key,
                 device[:32], now),
            )
        return Client(client_id, row["job_id"], name[:128], device[:32], now, sign_public_key, kx_public_key)

    def client(self, client_id: str) -> Client:
        """An enrolled client whose token is still valid.

        Raises:
            AuthError: unknown client, or its token was revoked.
        """
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._client_cache.clear()
                self._data_version = version
            cached = self._client_cache.get(client_id)
            if cached is not None:
                return cached
            row = self._db.execute(
                "SELECT c.client_id, c.job_id, c.name, c.device, c.joined, c.sign_public_key, c.kx_public_key, "
                "t.revoked FROM clients c JOIN tokens t ON t.token_hash = c.token_hash WHERE c.client_id=?",
                (client_id,),
            ).fetchone()
            if row is None:
                raise AuthError(f"unknown client {client_id!r}: join with an enrollment token")
            if row["revoked"]:
                raise AuthError(f"the token client {client_id} enrolled with was revoked")
            d = dict(row)
            d.pop("revoked")
            client = self._client_cache[client_id] = Client(**d)
            return client

    def clients(self, job_id: str) -> list[Client]:
        """Clients enrolled in a job."""
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, job_id, name, device, joined, sign_public_key, kx_public_key FROM clients "
                "WHERE job_id=? ORDER BY joined",
                (job_id,),
            ).fetchall()
        return [Client(**dict(r)) for r in rows]

    # ---------------------------------------------------------------- rounds and tasks
    @staticmethod
    def _round(row: sqlite3.Row) -> Round:
        d = dict(row)
        return Round(
            job_id=d["job_id"], round=d["round"], state=d["state"], opened=d["opened"],
            deadline=d["deadline"], cohort=_cohort(d["cohort_json"]),
            global_in=d["global_in"], global_out=d["global_out"],
            metrics=json.loads(d["metrics_json"] or "{}"), closed=d["closed"],
        )

    def open_round(self, job_id: str, rnd: int, cohort: list[str], global_in: str, deadline: float) -> Round:
        """Opens round ``rnd`` with a cohort; each member gets a task."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, rnd, "open", time.time(), deadline, json.dumps(cohort), global_in, None, None, None),
            )
            db.executemany(
                "INSERT INTO tasks (task_id, job_id, round, client_id) VALUES (?,?,?,?)",
                [("task-" + secrets.token_hex(6), job_id, rnd, c) for c in cohort],
            )
        return self.round(job_id, rnd)

    def extend_round(self, job_id: str, rnd: int, add: list[str], deadline: float) -> Round:
        """Adds cohort members to an open round and moves its deadline."""
        with self._tx() as db:
            row = db.execute("SELECT cohort_json FROM rounds WHERE job_id=? AND round=?", (job_id, rnd)).fetchone()
            cohort = json.loads(row["cohort_json"]) + add
            db.execute(
                "UPDATE rounds SET cohort_json=?, deadline=? WHERE job_id=? AND round=?",
                (json.dumps(cohort), deadline, job_id, rnd),
            )
            db.executemany(
                "INSERT INTO tasks (task_id, job_id, round, client_id) VALUES (?,?,?,?)",
                [("task-" + secrets.token_hex(6), job_id, rnd, c) for c in add],
            )
        return self.round(job_id, rnd)

    def set_round_state(self, job_id: str, rnd: int, new: str) -> None:
        """Moves a round on (open -> closing); a closing round accepts no more updates."""
        with self._tx() as db:
            db.execute("UPDATE rounds SET state=? WHERE job_id=? AND round=?", (new, job_id, rnd))

    def round(self, job_id: str, rnd: int) -> Round:
        """One round."""
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE job_id=? AND round=?", (job_id, rnd)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no round {rnd}")
        return self._round(row)

    def find_round(self, job_id: str, rnd: int) -> Round | None:
        """One round, or None when it was never opened."""
        try:
            return self.round(job_id, rnd)
        except NotFound:
            return None

    def rounds(self, job_id: str) -> list[Round]:
        """All rounds of a job, in order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds WHERE job_id=? ORDER BY round", (job_id,)).fetchall()
        return [self._round(r) for r in rows]

    def task_for(self, job_id: str, rnd: int, client_id: str) -> str | None:
        """The task id of a cohort member, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT task_id FROM tasks WHERE job_id=? AND round=? AND client_id=?", (job_id, rnd, client_id)
            ).fetchone()
        return row[0] if row else None

    def ensure_task(self, job_id: str, rnd: int, client_id: str) -> str:
        """Async mode: the client's task in round ``rnd``, created (and the client added to the
        round's cohort) on first ask."""
        with self._tx() as db:
            row = db.execute("SELECT task_id FROM tasks WHERE job_id=? AND round=? AND client_id=?",
                             (job_id, rnd, client_id)).fetchone()
            if row:
                return str(row[0])
            task_id = "task-" + secrets.token_hex(6)
            db.execute("INSERT INTO tasks (task_id, job_id, round, client_id) VALUES (?,?,?,?)",
                       (task_id, job_id, rnd, client_id))
            cohort = json.loads(db.execute("SELECT cohort_json FROM rounds WHERE job_id=? AND round=?",
                                           (job_id, rnd)).fetchone()[0])
            db.execute("UPDATE rounds SET cohort_json=? WHERE job_id=? AND round=?",
                       (json.dumps([*cohort, client_id]), job_id, rnd))
        return task_id

    def task(self, task_id: str) -> tuple[str, int, str] | None:
        """(job_id, round, client_id) of a task."""
        with self._lock:
            row = self._db.execute("SELECT job_id, round, client_id FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def add_bytes_down(self, job_id: str, client_id: str, rnd: int, n: int) -> None:
        """Counts bytes served to a client for a round (for the per-round report)."""
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET bytes_down=bytes_down+? WHERE job_id=? AND round=? AND client_id=?",
                (n, job_id, rnd, client_id),
            )

    def bytes_down(self, job_id: str, rnd: int) -> int:
        """Bytes served to a round's cohort."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(bytes_down),0) FROM tasks WHERE job_id=? AND round=?", (job_id, rnd)
            ).fetchone()
        return int(row[0])

    # ---------------------------------------------------------------- updates
    def add_update(self, u: Update) -> bool:
        """Stores an accepted update. Returns False (and changes nothing) for a known update id.

        Raises:
            PreconditionFailed: the round is no longer open or the client already submitted.
        """
        with self._tx() as db:
            prior = db.execute("SELECT job_id, round, client_id FROM updates WHERE update_id=?", (u.update_id,)).fetchone()
            if prior is not None:
                if tuple(prior) != (u.job_id, u.round, u.client_id):
                    raise PreconditionFailed(f"update id {u.update_id} was already used for another update")
                return False
            rnd = db.execute("SELECT state FROM rounds WHERE job_id=? AND round=?", (u.job_id, u.round)).fetchone()
            if rnd is None or rnd["state"] != "open":
                raise PreconditionFailed(f"round {u.round} of job {u.job_id} is not open")
            if db.execute(
                "SELECT 1 FROM updates WHERE job_id=? AND round=? AND client_id=?", (u.job_id, u.round, u.client_id)
            ).fetchone():
                raise PreconditionFailed(f"client {u.client_id} already submitted an update for round {u.round}")
            db.execute(
                "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (u.update_id, u.job_id, u.round, u.client_id, u.task_id, u.sha256, u.size, u.num_examples,
                 json.dumps(u.metrics), u.codec, u.received),
            )
        return True

    def find_update(self, update_id: str) -> Update | None:
        """An accepted update by its id, in any round."""
        with self._lock:
            row = self._db.execute("SELECT * FROM updates WHERE update_id=?", (update_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["metrics"] = json.loads(d.pop("metrics_json"))
        return Update(**d)

    def updates(self, job_id: str, rnd: int) -> list[Update]:
        """Accepted updates of a round, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM updates WHERE job_id=? AND round=? ORDER BY received, update_id", (job_id, rnd)
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["metrics"] = json.loads(d.pop("metrics_json"))
            out.append(Update(**d))
        return out

    def update_clients(self, job_id: str, rnd: int) -> set[str]:
        """The clients whose update a round has accepted (what :meth:`updates` holds, ids only: the
        engine asks after every accepted update)."""
        with self._lock:
            rows = self._db.execute("SELECT client_id FROM updates WHERE job_id=? AND round=?", (job_id, rnd)).fetchall()
        return {r[0] for r in rows}

    def has_update(self, job_id: str, rnd: int, client_id: str) -> bool:
        """Whether a client already submitted for a round."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM updates WHERE job_id=? AND round=? AND client_id=?", (job_id, rnd, client_id)
            ).fetchone() is not None

    # ---------------------------------------------------------------- closing rounds
    def close_round(self, job_id: str, rnd: int, global_out: str, metrics: dict[str, float],
                    path: str, manifest_json: str, last: bool, privacy_json: str | None = None,
                    strategy_state: str | None = None) -> None:
        """Aggregates and publishes a round in one transaction: the new global, its metrics, the
        published adapter, the privacy accountant, the strategy's state (a blob's sha256) and the
        job's next round (or, with ``last``, its end) all land together."""
        with self._tx() as db:
            self._record_aggregate(db, job_id, rnd, global_out, metrics, privacy_json, strategy_state)
            self._record_publication(db, job_id, rnd, metrics, path, manifest_json)
            if last:
                db.execute("UPDATE jobs SET state='finished', current_round=? WHERE job_id=?", (rnd, job_id))

    def aggregate_round(self, job_id: str, rnd: int, global_out: str, metrics: dict[str, float],
                        privacy_json: str | None = None, strategy_state: str | None = None) -> None:
        """Records round ``rnd``'s aggregate in one transaction (the new global, the privacy
        accountant, the strategy's state) and moves the job to the next round; the round is
        ``aggregated`` until :meth:`publish_round` (its evaluation and adapter directory) lands."""
        with self._tx() as db:
            self._record_aggregate(db, job_id, rnd, global_out, metrics, privacy_json, strategy_state)

    def publish_round(self, job_id: str, rnd: int, metrics: dict[str, float], path: str, manifest_json: str) -> None:
        """Records an aggregated round's publication: its full metrics and its adapter directory."""
        with self._tx() as db:
            self._record_publication(db, job_id, rnd, metrics, path, manifest_json)

    @staticmethod
    def _record_aggregate(db: sqlite3.Connection, job_id: str, rnd: int, global_out: str, metrics: dict[str, float],
                          privacy_json: str | None, strategy_state: str | None) -> None:
        if strategy_state is not None:
            db.execute("INSERT OR REPLACE INTO strategy_states VALUES (?,?,?)", (job_id, rnd, strategy_state))
        if privacy_json is not None:
            db.execute("UPDATE jobs SET privacy_json=? WHERE job_id=?", (privacy_json, job_id))
        db.execute(
            "UPDATE rounds SET state='aggregated', global_out=?, metrics_json=?, closed=? WHERE job_id=? AND round=?",
            (global_out, json.dumps(metrics), time.time(), job_id, rnd),
        )
        db.execute("UPDATE jobs SET current_round=? WHERE job_id=?", (rnd + 1, job_id))

    @staticmethod
    def _record_publication(db: sqlite3.Connection, job_id: str, rnd: int, metrics: dict[str, float], path: str,
                            manifest_json: str) -> None:
        db.execute("UPDATE rounds SET state='published', metrics_json=? WHERE job_id=? AND round=?",
                   (json.dumps(metrics), job_id, rnd))
        db.execute("INSERT OR REPLACE INTO published VALUES (?,?,?,?)", (job_id, rnd, path, manifest_json))

    @property
    def tags(self) -> AdapterTags:
        """The registry's tags on published rounds (fedtune.registry.tags), written in this database's transactions."""
        return AdapterTags(self._tx, self._lock, self._db)

    def published_count(self, job_id: str) -> int:
        """How many of a job's rounds are published."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM published WHERE job_id=?", (job_id,)).fetchone()[0])

    def release_task(self, job_id: str, rnd: int, client_id: str, reason: str) -> bool:
        """A cohort member left: its round no longer waits for it (it stays in the cohort, which is
        the planned size DP divides by). Returns False when it was released already."""
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO released_tasks VALUES (?,?,?,?,?)",
                             (job_id, rnd, client_id, reason, time.time()))
            return cur.rowcount > 0

    def released(self, job_id: str, rnd: int) -> set[str]:
        """Cohort members of a round that left before sending their update."""
        with self._lock:
            rows = self._db.execute("SELECT client_id FROM released_tasks WHERE job_id=? AND round=?",
                                    (job_id, rnd)).fetchall()
        return {r[0] for r in rows}

    def strategy_state(self, job_id: str, rnd: int) -> str | None:
        """The blob of the strategy state that round ``rnd`` left (None: none kept, or no such round)."""
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM strategy_states WHERE job_id=? AND round=?",
                                   (job_id, rnd)).fetchone()
        return row[0] if row else None

    def client_features(self, client_id: str) -> tuple[str, ...]:
        """What a client's agent said at Join that it runs (empty for agents older than features)."""
        with self._lock:
            row = self._db.execute("SELECT features_json FROM client_features WHERE client_id=?",
                                   (client_id,)).fetchone()
        return tuple(json.loads(row[0])) if row else ()

    # ---------------------------------------------------------------- federated evaluation
    def add_client_eval(self, job_id: str, rnd: int, client_id: str, num_examples: int,
                        metrics: dict[str, float]) -> bool:
        """Stores a client's evaluation of round ``rnd``. Returns False (changing nothing) for a repeat."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM client_evals WHERE job_id=? AND round=? AND client_id=?",
                          (job_id, rnd, client_id)).fetchone():
                return False
            db.execute("INSERT INTO client_evals VALUES (?,?,?,?,?,?)",
                       (job_id, rnd, client_id, num_examples, json.dumps(metrics), time.time()))
        return True

    def client_evals(self, job_id: str, rnd: int | None = None) -> list[tuple[int, str, int, dict[str, float]]]:
        """(round, client_id, num_examples, metrics) of clients' evaluations, by round then arrival."""
        with self._lock:
            if rnd is None:
                rows = self._db.execute("SELECT * FROM client_evals WHERE job_id=? ORDER BY round, received",
                                        (job_id,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM client_evals WHERE job_id=? AND round=? ORDER BY received",
                                        (job_id, rnd)).fetchall()
        return [(r["round"], r["client_id"], r["num_examples"], json.loads(r["metrics_json"])) for r in rows]

    def has_client_eval(self, job_id: str, rnd: int, client_id: str) -> bool:
        """Whether a client reported its evaluation of round ``rnd``."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM client_evals WHERE job_id=? AND round=? AND client_id=?",
                                    (job_id, rnd, client_id)).fetchone() is not None

    def published(self, job_id: str | None = None) -> list[tuple[str, int, str, str]]:
        """(job_id, round, path, manifest_json) of published adapters."""
        with self._lock:
            if job_id:
                rows = self._db.execute("SELECT * FROM published WHERE job_id=? ORDER BY round", (job_id,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM published ORDER BY job_id, round").fetchall()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    # ---------------------------------------------------------------- secure aggregation
    def secagg_round(self, job_id: str, rnd: int) -> SecAggRound | None:
        """The secure-aggregation state of a round, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM secagg_rounds WHERE job_id=? AND round=?", (job_id, rnd)).fetchone()
        if row is None:
            return None
        d = dict(row)
        return SecAggRound(d["job_id"], d["round"], d["attempt"], bytes(d["params"]),
                           tuple(json.loads(d["members_json"])), d["phase"], d["deadline"])

    def start_secagg(self, job_id: str, rnd: int, params: bytes, members: list[str], deadline: float) -> SecAggRound:
        """Records the parameters of a new attempt at a round (the attempt counter goes up)."""
        with self._tx() as db:
            prev = db.execute("SELECT attempt FROM secagg_rounds WHERE job_id=? AND round=?", (job_id, rnd)).fetchone()
            attempt = (prev[0] + 1) if prev else 1
            db.execute("INSERT OR REPLACE INTO secagg_rounds VALUES (?,?,?,?,?,?,?)",
                       (job_id, rnd, attempt, params, json.dumps(members), "advertise", deadline))
        found = self.secagg_round(job_id, rnd)
        assert found is not None
        return found

    def set_secagg_phase(self, job_id: str, rnd: int, phase: str, deadline: float,
                         outbox: dict[int, bytes]) -> None:
        """Moves an attempt to its next phase and stores what each participant is sent, together."""
        with self._tx() as db:
            attempt = db.execute("SELECT attempt FROM secagg_rounds WHERE job_id=? AND round=?",
                                 (job_id, rnd)).fetchone()[0]
            db.executemany("INSERT OR REPLACE INTO secagg_outbox VALUES (?,?,?,?,?,?)",
                           [(job_id, rnd, attempt, phase, i, payload) for i, payload in outbox.items()])
            db.execute("UPDATE secagg_rounds SET phase=?, deadline=? WHERE job_id=? AND round=?",
                       (phase, deadline, job_id, rnd))

    def secagg_outbox(self, job_id: str, rnd: int, attempt: int, phase: str, receiver: int) -> bytes | None:
        """What a participant is sent in a phase, if anything."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM secagg_outbox WHERE job_id=? AND round=? AND attempt=? AND phase=? AND receiver=?",
                (job_id, rnd, attempt, phase, receiver)).fetchone()
        return bytes(row[0]) if row else None

    def add_secagg_message(self, job_id: str, rnd: int, attempt: int, phase: str, sender: int, payload: bytes,
                           signature: bytes = b"") -> bool:
        """Stores one participant's message for a phase. Returns False for a repeat (nothing changes).

        Raises:
            PreconditionFailed: the attempt is not in that phase any more, or the sender sent something else.
        """
        with self._tx() as db:
            row = db.execute("SELECT attempt, phase FROM secagg_rounds WHERE job_id=? AND round=?",
                             (job_id, rnd)).fetchone()
            if row is None or row["attempt"] != attempt or row["phase"] != phase:
                raise PreconditionFailed(f"round {rnd} attempt {attempt} of job {job_id} is not in phase {phase}")
            prior = db.execute(
                "SELECT payload FROM secagg_inbox WHERE job_id=? AND round=? AND attempt=? AND phase=? AND sender=?",
                (job_id, rnd, attempt, phase, sender)).fetchone()
            if prior is not None:
                if bytes(prior[0]) != payload:
                    raise PreconditionFailed(f"participant {sender} already sent a different {phase} message")
                return False
            db.execute("INSERT INTO secagg_inbox VALUES (?,?,?,?,?,?,?,?)",
                       (job_id, rnd, attempt, phase, sender, payload, signature, time.time()))
        return True

    def secagg_messages(self, job_id: str, rnd: int, attempt: int, phase: str) -> list[tuple[int, bytes, bytes]]:
        """(sender, payload, signature) of a phase, by sender index."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sender, payload, signature FROM secagg_inbox WHERE job_id=? AND round=? AND attempt=? "
                "AND phase=? ORDER BY sender", (job_id, rnd, attempt, phase)).fetchall()
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    def abandon_round(self, job_id: str, rnd: int) -> None:
        """Drops an attempt whose sum cannot be recovered: the round reopens with a new cohort.

        Its masked inputs are deleted with it: without the attempt's masks they are noise.
        """
        with self._tx() as db:
            db.execute("UPDATE secagg_rounds SET phase='abandoned' WHERE job_id=? AND round=?", (job_id, rnd))
            for table in ("updates", "tasks", "rounds"):
                db.execute(f"DELETE FROM {table} WHERE job_id=? AND round=?", (job_id, rnd))
