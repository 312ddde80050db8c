"""Which queued jobs start now, and on which node: priority with aging, head-of-line reservation, quotas.

Each job reserves its quota (CPUs, GPUs, memory) on one node while it runs (its aggregation and
evaluation run in one process, so the quota cannot be split across machines); the reservations
on a node never exceed what that node has, so no job's aggregation or evaluation can take
another's share, and a job is admitted only where it can be placed: 3 CPUs spread as 1 + 2 over
two nodes do not admit a 3-CPU job.
Waiting jobs are ordered by effective priority (the spec's priority plus one level per
``AGING_SECONDS`` waited, so a low-priority job is not starved by a stream of higher ones), then by
age. Jobs start in that order; the first one that does not fit blocks the ones behind it (no
backfilling past it, so a large job is not starved by small ones). A job that could not fit even
on an empty node never blocks anyone: it waits with the reason shown, naming every node's size.
A job starts on the node where it fits most tightly (fewest GPUs, then CPUs, left over), which
keeps large nodes and GPU nodes for the jobs that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

AGING_SECONDS = 60.0
# Nodes named one by one in a reason; the rest are counted.
_NODES_NAMED = 4


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
class Node:
    """A node as the scheduler sees it: what it has, and what the running jobs leave free on it."""

    node_id: str
    label: str  # how a reason names it, e.g. ``10.0.0.5 (node 3f2a9c1e)``
    total: Demand
    free: Demand


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    job_id: str
    priority: int
    since: float  # when it was queued
    demand: Demand


@dataclass(frozen=True)
class Plan:
    """What to start now (and on which node), and for every job left waiting its place in line
    (1 = next) and why."""

    start: list[str]
    queue: dict[str, tuple[int, str]]
    nodes: dict[str, str] = field(default_factory=dict)  # started job -> node id


def effective_priority(w: Waiting, now: float) -> float:
    """Priority plus one level per AGING_SECONDS waited."""
    return w.priority + max(0.0, now - w.since) / AGING_SECONDS


def plan(waiting: list[Waiting], free: Demand, total: Demand, now: float) -> Plan:
    """Decides which waiting jobs start on a cluster seen as one node (``free`` of ``total``)."""
    return place(waiting, [Node("cluster", "the cluster", total, free)], now)


def _listing(nodes: Sequence[Node], amount: str) -> str:
    shown = [f"{n.label} {getattr(n, amount).describe()}" for n in nodes[:_NODES_NAMED]]
    if len(nodes) > _NODES_NAMED:
        shown.append(f"{len(nodes) - _NODES_NAMED} more")
    return ", ".join(shown)


def _never_fits(d: Demand, nodes: Sequence[Node]) -> str:
    if len(nodes) == 1:
        return f"needs {d.describe()}; {nodes[0].label} has {nodes[0].total.describe()} in all"
    if not nodes:
        return f"needs {d.describe()}; the cluster has no live node"
    total = sum((n.total for n in nodes), Demand())
    spread = " (the cluster has that only in all, spread over nodes)" if d.fits(total) else ""
    return f"needs {d.describe()} on one node; no node has that{spread}: {_listing(nodes, 'total')}"


def _not_free(d: Demand, nodes: Sequence[Node]) -> str:
    if len(nodes) == 1:
        return f"needs {d.describe()}; {nodes[0].free.describe()} free until a running job ends"
    return f"needs {d.describe()} on one node; free now: {_listing(nodes, 'free')}; until a running job ends"


def _tightest(d: Demand, nodes: dict[str, Node], free: dict[str, Demand]) -> str | None:
    """The node where ``d`` fits leaving the fewest GPUs, then CPUs, then memory free (None: nowhere)."""
    fitting = [n for n in nodes.values() if d.fits(free[n.node_id])]
    if not fitting:
        return None
    order = list(nodes)

    def left(n: Node) -> tuple[float, float, float, int]:
        rest = free[n.node_id] - d
        return rest.gpus, rest.cpus, rest.memory_gb, order.index(n.node_id)

    return min(fitting, key=left).node_id


def place(waiting: list[Waiting], nodes: Sequence[Node], now: float) -> Plan:
    """Decides which waiting jobs start now and on which of ``nodes``, given what is free on each."""
    order = sorted(waiting, key=lambda w: (-effective_priority(w, now), w.since, w.job_id))
    by_id = {n.node_id: n for n in nodes}
    free = {n.node_id: n.free for n in nodes}
    start: list[str] = []
    chosen: dict[str, str] = {}
    queue: dict[str, tuple[int, str]] = {}
    blocked_by: str | None = None
    for w in order:
        if not any(w.demand.fits(n.total) for n in nodes):
            queue[w.job_id] = (0, _never_fits(w.demand, nodes))
            continue
        node = _tightest(w.demand, by_id, free) if blocked_by is None else None
        if node is not None:
            start.append(w.job_id)
            chosen[w.job_id] = node
            free[node] = free[node] - w.demand
            continue
        if blocked_by is None:
            blocked_by = w.job_id
            now_free = [Node(n.node_id, n.label, n.total, free[n.node_id]) for n in nodes]
            reason = _not_free(w.demand, now_free)
        else:
            reason = f"behind {blocked_by} in the queue"
        queue[w.job_id] = (0, reason)
    # Places in line over every waiting job, in scheduling order.
    ranked = [w.job_id for w in order if w.job_id in queue]
    return Plan(start, {job: (i + 1, queue[job][1]) for i, job in enumerate(ranked)}, chosen)
