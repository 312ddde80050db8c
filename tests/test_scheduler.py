"""The job scheduler's decisions: priority, aging, quotas, head-of-line, infeasible jobs."""

from __future__ import annotations

from fedtune.cluster.scheduler import AGING_SECONDS, Demand, Node, Waiting, place, plan

CLUSTER = Demand(cpus=4, gpus=1, memory_gb=16)


def _w(job: str, priority: int = 0, since: float = 0.0, cpus: float = 1, gpus: float = 0) -> Waiting:
    return Waiting(job, priority, since, Demand(cpus, gpus, 0))


def test_jobs_start_by_priority_while_their_quotas_fit() -> None:
    decided = plan([_w("low", 0, since=1), _w("high", 5, since=2), _w("mid", 2, since=3)],
                   Demand(2, 1, 16), CLUSTER, now=3)
    assert decided.start == ["high", "mid"]
    assert decided.queue == {"low": (1, "needs 1 CPU; 0 CPUs, 1 GPU, 16.0 GB free until a running job ends")}


def test_waiting_raises_priority_so_a_low_priority_job_is_not_starved() -> None:
    old = _w("old-low", 0, since=0)
    new = _w("new-high", 2, since=3 * AGING_SECONDS)
    # Three minutes of waiting outweigh two priority levels...
    assert plan([old, new], Demand(1, 0, 0), CLUSTER, now=3 * AGING_SECONDS).start == ["old-low"]
    # ...half a minute does not.
    assert plan([_w("old-low", 0, since=2.5 * AGING_SECONDS), new], Demand(1, 0, 0), CLUSTER,
                now=3 * AGING_SECONDS).start == ["new-high"]


def test_a_large_job_at_the_head_is_not_overtaken_by_small_ones() -> None:
    decided = plan([_w("big", 1, since=0, cpus=3), _w("small", 0, since=1, cpus=1)], Demand(2, 1, 16), CLUSTER,
                   now=2)
    assert decided.start == []
    assert decided.queue["big"][0] == 1 and decided.queue["small"] == (2, "behind big in the queue")


def test_a_job_larger_than_the_cluster_waits_with_the_reason_and_blocks_nobody() -> None:
    decided = plan([_w("huge", 9, since=0, cpus=64), _w("gpu", 9, since=0, gpus=2), _w("fits", 0, since=5)],
                   CLUSTER, CLUSTER, now=5)
    assert decided.start == ["fits"]
    assert decided.queue["huge"][1] == "needs 64 CPUs; the cluster has 4 CPUs, 1 GPU, 16.0 GB in all"
    assert "needs 1 CPU, 2 GPUs" in decided.queue["gpu"][1]
    assert sorted(p for p, _ in decided.queue.values()) == [1, 2]


# Two nodes: 1 CPU (the head) and 2 CPUs with a GPU.
NODES = [Node("a", "head", Demand(1, 0, 8), Demand(1, 0, 8)), Node("b", "node2", Demand(2, 1, 8), Demand(2, 1, 8))]


def test_a_job_is_admitted_only_where_its_whole_quota_fits_on_one_node() -> None:
    # 3 CPUs exist in all, but on no single node: the job waits, naming each node's size.
    decided = place([_w("spread", cpus=3), _w("two", since=1, cpus=2)], NODES, now=1)
    assert decided.start == ["two"] and decided.nodes == {"two": "b"}
    assert decided.queue["spread"] == (1, "needs 3 CPUs on one node; no node has that (the cluster has that only "
                                          "in all, spread over nodes): head 1 CPU, 8.0 GB, node2 2 CPUs, 1 GPU, 8.0 GB")


def test_jobs_go_to_the_node_they_fit_most_tightly_and_wait_with_per_node_free_space() -> None:
    decided = place([_w("cpu1", since=0), _w("gpu", since=1, gpus=1), _w("cpu2", since=2, cpus=2)], NODES, now=3)
    # The 1-CPU job leaves the GPU node alone; the GPU job can only go there; then no node has 2 CPUs free.
    assert decided.start == ["cpu1", "gpu"] and decided.nodes == {"cpu1": "a", "gpu": "b"}
    assert decided.queue["cpu2"] == (1, "needs 2 CPUs on one node; free now: head 0 CPUs, 8.0 GB, node2 1 CPU, "
                                        "8.0 GB; until a running job ends")


def test_a_single_node_cluster_keeps_the_cluster_wording() -> None:
    decided = place([_w("big", cpus=2)], NODES[:1], now=0)
    assert decided.queue["big"] == (1, "needs 2 CPUs; head has 1 CPU, 8.0 GB in all")
