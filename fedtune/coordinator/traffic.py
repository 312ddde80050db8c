"""What the client API saw pass through this process: updates accepted and refused, bytes in and out.

These are events, not state: a refused upload changes no state by design, and bytes served outside
a round's task are in no table, so the client servicer counts them as they happen. Every client RPC
lands in the coordinator's own process (engines in Ray actors never see one), so the counts are
complete in both modes; they start from zero when the process does, as Prometheus counters may.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class TrafficSnapshot:
    """The counts at one moment, by job (and by job and reason for refusals)."""

    accepted: dict[str, int]
    rejected: dict[tuple[str, str], int]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]


class TrafficCounts:
    """Thread-safe running totals, written by the servicer's threads and read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted: Counter[str] = Counter()
        self._rejected: Counter[tuple[str, str]] = Counter()
        self._up: Counter[str] = Counter()
        self._down: Counter[str] = Counter()

    def accepted(self, job_id: str, nbytes: int) -> None:
        """A fresh update of ``nbytes`` was stored (a retry of a stored one is not counted)."""
        with self._lock:
            self._accepted[job_id] += 1
            self._up[job_id] += nbytes

    def rejected(self, job_id: str, reason: str) -> None:
        """An upload was refused; ``reason`` is the status it was refused with (``invalid_argument``...)."""
        with self._lock:
            self._rejected[(job_id, reason)] += 1

    def served(self, job_id: str, nbytes: int) -> None:
        """``nbytes`` of artifacts (base, emulator, adapters) went to a client of ``job_id``."""
        if nbytes > 0:
            with self._lock:
                self._down[job_id] += nbytes

    def snapshot(self) -> TrafficSnapshot:
        """A consistent copy of every count."""
        with self._lock:
            return TrafficSnapshot(dict(self._accepted), dict(self._rejected), dict(self._up), dict(self._down))
