"""Which virtual clients run where: the simulation's worker pool, sized and fed without Ray.

The pool is a fixed set of long-lived workers (Ray actors in :mod:`fedtune.simulation.pool`), each
running one group of virtual clients at a time. This module holds the decisions only, so they are
tested without a cluster: how many workers the cluster's resources allow, and a first-in, first-out
queue of the cohort members the coordinator is waiting for, handed out in groups of up to
``batch_clients`` to whichever workers are free.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from fedtune.errors import InvalidInput


@dataclass(frozen=True)
class ClientResources:
    """What each worker reserves for its life (it runs one virtual client, or one batch, at a time)."""

    cpus: float = 0.25
    gpus: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ClientResources:
        """``cpus=0.5,gpus=0`` -> ClientResources."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("cpus", "gpus"):
                raise InvalidInput(f"--client-resources: unknown resource {key!r} (use cpus=..,gpus=..)")
            try:
                values[key] = float(value)
            except ValueError:
                raise InvalidInput(f"--client-resources: {key} must be a number, got {value!r}") from None
            if values[key] < 0:
                raise InvalidInput(f"--client-resources: {key} must not be negative")
        return cls(**values)


def pool_size(cluster_cpus: float, cluster_gpus: float, per_worker: ClientResources, max_in_flight: int,
              workers: int | None = None) -> int:
    """How many workers to start.

    As many as the cluster holds at ``per_worker`` each, but no more than can ever be busy at once
    (``max_in_flight``: a round's cohort, in groups); ``workers`` overrides the count (still capped
    by ``max_in_flight``).

    Raises:
        InvalidInput: not even one worker fits (e.g. ``gpus=1`` on a cluster without GPUs).
    """
    if workers is not None:
        if workers < 1:
            raise InvalidInput(f"--workers must be at least 1, got {workers}")
        return max(1, min(workers, max_in_flight))
    fits = [max_in_flight]
    for have, want, name in ((cluster_cpus, per_worker.cpus, "CPUs"), (cluster_gpus, per_worker.gpus, "GPUs")):
        if want > 0:
            # A hair under the exact quotient: 2 / 0.1 is 19.999... in floating point.
            n = math.floor(have / want + 1e-9)
            if n < 1:
                raise InvalidInput(f"--client-resources asks {want:g} {name} per worker; the Ray cluster has "
                                   f"{have:g}")
            fits.append(n)
    return max(1, min(fits))


class CohortQueue:
    """Virtual clients waiting for a worker, and what each worker is running.

    Clients are queued one by one as the coordinator wants them and grouped when a worker is free,
    so a group takes whoever is waiting then (up to ``batch_clients``): first those the worker ran
    last time (it still holds what they prepared), then the longest waiting.
    """

    def __init__(self, workers: int = 0, batch_clients: int = 1) -> None:
        """Args:
            workers: Workers free from the start, named 0 .. workers - 1 (more join with :meth:`add_worker`).
            batch_clients: Most clients handed to one worker at a time.
        """
        if workers < 0 or batch_clients < 1:
            raise ValueError(f"need workers >= 0 and at least one client per group, got {workers}, {batch_clients}")
        self.batch_clients = batch_clients
        self._waiting: dict[str, None] = {}  # in queueing order
        self._free: deque[int] = deque(range(workers))
        self._running: dict[int, list[str]] = {}
        self._last: dict[str, int] = {}  # client -> the worker it last ran on
        self._ran: dict[int, dict[str, None]] = {}  # worker -> clients it ran (some have run elsewhere since)

    def enqueue(self, clients: list[str]) -> None:
        """Queues clients (in order); one already queued or running is not queued twice."""
        busy = self.busy()
        for c in clients:
            if c not in busy:
                self._waiting[c] = None
                busy.add(c)

    def busy(self) -> set[str]:
        """Clients queued or running."""
        return set(self._waiting) | {c for group in self._running.values() for c in group}

    def waiting(self) -> int:
        """Clients queued, not yet on a worker."""
        return len(self._waiting)

    def dispatch(self) -> list[tuple[int, list[str]]]:
        """Hands the waiting clients to free workers; returns (worker, group) pairs to start."""
        out = []
        while self._waiting and self._free:
            worker = self._free.popleft()
            group = self._take(worker, min(self.batch_clients, len(self._waiting)))
            self._running[worker] = group
            for c in group:
                self._last[c] = worker
                self._ran.setdefault(worker, {})[c] = None
            out.append((worker, group))
        return out

    def _take(self, worker: int, n: int) -> list[str]:
        """``n`` waiting clients for ``worker``: those it ran last first, then the longest waiting."""
        group: list[str] = []
        ran = self._ran.setdefault(worker, {})
        for c in list(ran):
            if len(group) == n:
                break
            if self._last.get(c) != worker:
                del ran[c]  # it ran elsewhere since
            elif c in self._waiting:
                del self._waiting[c], ran[c]
                group.append(c)
        while len(group) < n:
            c = next(iter(self._waiting))
            del self._waiting[c]
            group.append(c)
        return group

    def add_worker(self, worker: int) -> None:
        """A worker is ready for clients."""
        self._free.append(worker)

    def finished(self, worker: int, free: bool = True) -> list[str]:
        """``worker`` is done with its group (or failed it); returns the group and, with ``free``,
        takes the worker back (not for one that died: its replacement joins when it is ready)."""
        group = self._running.pop(worker)
        if free:
            self._free.append(worker)
        return group

    def running(self) -> dict[int, list[str]]:
        """Groups on workers now, by worker."""
        return dict(self._running)
