"""Which clients are connected: kept in memory, since it only matters while the process runs.

After a coordinator restart every client counts as away until its next heartbeat, which agents
send every few seconds. When job engines run in other processes (Ray actors), heartbeats are also
written, at most every half heartbeat per client, to a small SQLite file that those processes read.

Idle clients that poll are paced: the interval they are told grows with how many of them are
connected (at most IDLE_POLLS_PER_SECOND heartbeats a second together), and the window in which a
client counts as connected grows with it, so thousands of polling clients cost the coordinator a
bounded call rate. Clients holding a long-poll are not counted: a held call costs no thread and no
calls while it waits, the client asks again only when it ends (at most every 30 s), and its
presence is refreshed while it is held (:meth:`Presence.touch_many`).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from fedtune.coordinator.state import Client

# Clients poll for tasks at this interval, so it bounds how long a new round waits to be noticed.
DEFAULT_HEARTBEAT_SECONDS = 1
# A client missing this many heartbeats in a row is treated as gone.
MISSED_HEARTBEATS = 6
# Idle clients that poll (nothing to do, no held call) are paced so that together they send at
# most this many heartbeats a second: with thousands polling each polls less often, and the window
# in which a client counts as connected widens with its interval. Held long-polls are not counted.
IDLE_POLLS_PER_SECOND = 250.0


class Presence:
    """Last heartbeat time of each client."""

    def __init__(self, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS, shared: Path | None = None) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.interval = float(heartbeat_seconds)  # what idle clients are told now (see idle_interval)
        self._paced_at = 0.0
        self._seen: dict[str, float] = {}
        self._written: dict[str, float] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if shared is not None:
            self._db = sqlite3.connect(shared, check_same_thread=False, isolation_level=None, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Losing the last heartbeats in a crash costs nothing: clients send more.
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("CREATE TABLE IF NOT EXISTS presence (client_id TEXT PRIMARY KEY, seen REAL NOT NULL)")
            # The idle interval, for engines in other processes (their window widens with it).
            self._db.execute("CREATE TABLE IF NOT EXISTS pacing (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    def touch(self, client_id: str) -> bool:
        """Records a heartbeat. Returns True when the client was away (never seen, or silent for
        longer than the window) until now."""
        now = time.time()
        with self._lock:
            before = self._seen.get(client_id)
            returning = before is None or now - before > max(self.heartbeat_seconds, self.interval) * MISSED_HEARTBEATS
            self._seen[client_id] = now
            if self._db is not None and now - self._written.get(client_id, 0.0) >= self.heartbeat_seconds / 2:
                self._db.execute("INSERT OR REPLACE INTO presence VALUES (?, ?)", (client_id, now))
                self._written[client_id] = now
        return returning

    def touch_many(self, client_ids: list[str]) -> None:
        """Records a heartbeat of each client (its long-poll is held, so it is still there)."""
        now = time.time()
        with self._lock:
            for client_id in client_ids:
                self._seen[client_id] = now
            if self._db is not None:
                due = [c for c in client_ids if now - self._written.get(c, 0.0) >= self.heartbeat_seconds / 2]
                self._db.executemany("INSERT OR REPLACE INTO presence VALUES (?, ?)", [(c, now) for c in due])
                for client_id in due:
                    self._written[client_id] = now

    def window(self) -> float:
        """Seconds since its last heartbeat within which a client counts as connected."""
        interval = self.interval
        if self._db is not None:
            row = self._db.execute("SELECT value FROM pacing WHERE key='interval'").fetchone()
            interval = max(interval, row[0]) if row is not None else interval
        return max(self.heartbeat_seconds, interval) * MISSED_HEARTBEATS

    def idle_interval(self, held: int = 0) -> float:
        """How long an idle client should wait before its next heartbeat: the heartbeat interval,
        or longer when so many clients poll that they would send more than
        IDLE_POLLS_PER_SECOND together (recomputed at most once a second). ``held``: how many
        connected clients hold a long-poll now (they are not polling, so not counted)."""
        now = time.time()
        if now - self._paced_at >= 1.0:
            with self._lock:
                oldest = now - self.window()
                connected = sum(1 for at in self._seen.values() if at >= oldest)
                self._paced_at = now
            polling = max(0, connected - held)
            interval = max(float(self.heartbeat_seconds), polling / IDLE_POLLS_PER_SECOND)
            if self._db is not None and abs(interval - self.interval) > 0.05 * self.interval:
                with self._lock:
                    self._db.execute("INSERT OR REPLACE INTO pacing VALUES ('interval', ?)", (interval,))
            self.interval = interval
        return self.interval

    def idle_retry(self, held: int = 0) -> float:
        """What one idle polling client is told: :meth:`idle_interval`, and when that is paced
        (longer than the heartbeat interval) 80-120% of it at random, so that clients that started
        together (after a coordinator restart) spread out instead of polling in one burst each
        interval; the mean, and so the budget, stays the same."""
        interval = self.idle_interval(held)
        if interval <= self.heartbeat_seconds:
            return interval
        return interval * random.uniform(0.8, 1.2)

    def forget(self, client_id: str) -> None:
        """The client said it is leaving: it counts as away until its next heartbeat."""
        with self._lock:
            self._seen.pop(client_id, None)
            self._written.pop(client_id, None)
            if self._db is not None:
                self._db.execute("DELETE FROM presence WHERE client_id=?", (client_id,))

    def last_seen(self, client_id: str) -> float | None:
        """When the client was last heard from, or None."""
        with self._lock:
            seen = self._seen.get(client_id)
            if self._db is not None:
                row = self._db.execute("SELECT seen FROM presence WHERE client_id=?", (client_id,)).fetchone()
                if row is not None and (seen is None or row[0] > seen):
                    seen = row[0]
            return seen

    def is_live(self, client_id: str) -> bool:
        """Whether the client sent a heartbeat recently."""
        seen = self.last_seen(client_id)
        return seen is not None and time.time() - seen <= self.window()

    def live(self, clients: Iterable[Client]) -> list[str]:
        """Ids of the live clients among ``clients``."""
        with self._lock:
            seen = dict(self._seen)
            if self._db is not None:
                for client_id, at in self._db.execute("SELECT client_id, seen FROM presence"):
                    seen[client_id] = max(at, seen.get(client_id, at))
        oldest = time.time() - self.window()
        return [c.client_id for c in clients if seen.get(c.client_id, -1.0) >= oldest]
