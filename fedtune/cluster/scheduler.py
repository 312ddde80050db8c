"""Which queued jobs start now: priority with aging, head-of-line reservation, quotas.

Each job reserves its quota (CPUs, GPUs, memory) while it runs; the sum of reservations never
exceeds what the cluster has, so no job's aggregation or evaluation can take another's share.
Waiting jobs are ordered by effective priority (the spec's priority plus one level per
``AGING_SECONDS`` waited, so a low-priority job is not starved by a stream of higher ones), then by
age. Jobs start in that order; the first one that does not fit blocks the ones behind it (no
backfilling past it, so a large job is not starved by small ones). A job that could not fit even
on an empty cluster never blocks anyone: it waits with the reason shown.
"""

from __future__ import annotations

from dataclasses import dataclass

AGING_SECONDS = 60.0


@dataclass(frozen=True)
class Demand:
    """Resources: a job's quota, or what a cluster has."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_gb: float = 0.0

    def fits(self, free: Demand) -> bool:
        """Whether this demand fits in ``free`` (a tiny slack absorbs float sums)."""
        eps = 1e-9
        return (self.cpus <= free.cpus + eps and self.gpus <= free.gpus + eps
                and self.memory_gb <= free.memory_gb + eps)

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.cpus + other.cpus, self.gpus + other.gpus, self.memory_gb + other.memory_gb)

    def __sub__(self, other: Demand) -> Demand:
        return Demand(self.cpus - other.cpus, self.gpus - other.gpus, self.memory_gb - other.memory_gb)

    def describe(self) -> str:
        """``2 CPUs, 1 GPU, 4.0 GB`` (zero amounts left out)."""
        parts = [f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU{'s' if self.gpus != 1 else ''}")
        if self.memory_gb:
            parts.append(f"{self.memory_gb:.1f} GB")
        return ", ".join(parts)


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    job_id: str
    priority: int
    since: float  # when it was queued
    demand: Demand


@dataclass(frozen=True)
class Plan:
    """What to start now, and for every job left waiting its place in line (1 = next) and why."""

    start: list[str]
    queue: dict[str, tuple[int, str]]


def effective_priority(w: Waiting, now: float) -> float:
    """Priority plus one level per AGING_SECONDS waited."""
    return w.priority + max(0.0, now - w.since) / AGING_SECONDS


def plan(waiting: list[Waiting], free: Demand, total: Demand, now: float) -> Plan:
    """Decides which waiting jobs start given the ``free`` part of the cluster's ``total``."""
    order = sorted(waiting, key=lambda w: (-effective_priority(w, now), w.since, w.job_id))
    start: list[str] = []
    queue: dict[str, tuple[int, str]] = {}
    blocked_by: str | None = None
    for w in order:
        if not w.demand.fits(total):
            queue[w.job_id] = (0, f"needs {w.demand.describe()}; the cluster has {total.describe()} in all")
            continue
        if blocked_by is None and w.demand.fits(free):
            start.append(w.job_id)
            free = free - w.demand
            continue
        if blocked_by is None:
            blocked_by = w.job_id
            reason = f"needs {w.demand.describe()}; {free.describe()} free until a running job ends"
        else:
            reason = f"behind {blocked_by} in the queue"
        queue[w.job_id] = (0, reason)
    # Places in line over every waiting job, in scheduling order.
    ranked = [w.job_id for w in order if w.job_id in queue]
    return Plan(start, {job: (i + 1, queue[job][1]) for i, job in enumerate(ranked)})
