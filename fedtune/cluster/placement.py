"""Where a job runs on a Ray cluster: its node, and its quota held there as a placement group.

The scheduler (:mod:`fedtune.cluster.scheduler`) picks a node on which a job's whole quota fits;
the quota is then reserved in Ray on exactly that node (a one-bundle placement group with a
``ray.io/node-id`` label selector), so Ray's own accounting agrees with fedtune's and no other
work on the cluster can take it. The job's compute (its base's compute actor on that node, and its
GPU evaluation tasks inside the reservation) runs there. Engine actors stay on the coordinator's
node: they open the state dir's SQLite database, which must be on a local disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fedtune.cluster.scheduler import Demand, Node

NODE_ID_LABEL = "ray.io/node-id"
HEAD_RESOURCE = "node:__internal_head__"
# How long a new reservation may take before the job is left queued while Ray places it.
PLACE_WAIT_SECONDS = float(os.environ.get("FEDTUNE_PLACE_WAIT_SECONDS", "5"))


def node_label(node: dict[str, Any]) -> str:
    """How reasons and logs name a node: ``10.0.0.5 (node 3f2a9c1e, head)``."""
    head = ", head" if HEAD_RESOURCE in node.get("Resources", {}) else ""
    return f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]}{head})"


def cluster_nodes(ray: Any, used: dict[str, Demand]) -> list[Node]:
    """The cluster's live nodes, what each has and what ``used`` (by node id) leaves free; the head first."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    alive.sort(key=lambda n: (HEAD_RESOURCE not in n.get("Resources", {}), n["NodeManagerAddress"], n["NodeID"]))
    nodes = []
    for n in alive:
        r = n.get("Resources", {})
        total = Demand(float(r.get("CPU", 0.0)), float(r.get("GPU", 0.0)), float(r.get("memory", 0.0)) / 2**30)
        nodes.append(Node(n["NodeID"], node_label(n), total, total - used.get(n["NodeID"], Demand())))
    return nodes


def on_node(node_id: str) -> Any:
    """A scheduling strategy that runs an actor on ``node_id`` and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _bundle(demand: Demand) -> dict[str, float]:
    bundle = {"CPU": demand.cpus}
    if demand.gpus:
        bundle["GPU"] = demand.gpus
    if demand.memory_gb:
        bundle["memory"] = float(int(demand.memory_gb * 2**30))
    return bundle


@dataclass
class Reservation:
    """A job's quota held on one node."""

    node_id: str
    demand: Demand
    group: Any  # ray.util.placement_group.PlacementGroup
    _ready: Any = field(default=None, repr=False)

    def ready(self, ray: Any, timeout: float = 0.0) -> bool:
        """Whether Ray has placed it (waits up to ``timeout`` seconds)."""
        if self._ready is None:
            self._ready = self.group.ready()
        done, _ = ray.wait([self._ready], timeout=timeout)
        return bool(done)

    def release(self, ray: Any) -> None:
        """Gives the quota back to the cluster."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def reserve(ray: Any, demand: Demand, node_id: str, name: str) -> Reservation:
    """Asks Ray to hold ``demand`` on ``node_id`` (see :meth:`Reservation.ready`)."""
    from ray.util.placement_group import placement_group

    group = placement_group([_bundle(demand)], strategy="STRICT_PACK", name=name,
                            bundle_label_selector=[{NODE_ID_LABEL: node_id}])
    return Reservation(node_id, demand, group)

