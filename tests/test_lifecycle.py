"""A round's latency and a client's lifecycle: event-driven rounds, long-polled tasks, presence
while training, Leave on SIGINT, giving up on an unreachable coordinator, publication beside the
next round (and a coordinator killed between the two). Real gRPC, real agents, real SQLite."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.data import write_synthetic_federation
from fedtune.peft_io import tensors_to_bytes
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, fedtune_cmd, make_spec, spawn, wait_until
from tests.test_integration import Cluster, _free_port
from tests.test_rpc_contract import RawClient


def _zero_update(raw: RawClient, task: pb.Task, update_id: str) -> pb.UploadReply:
    state = raw.global_state(task)
    return raw.send(task, tensors_to_bytes({k: torch.zeros_like(v) for k, v in state.items()}), update_id=update_id)


def _long_poll(raw: RawClient, wait: float, out: list[tuple[float, pb.HeartbeatReply]]) -> threading.Thread:
    def run() -> None:
        reply = raw.stub.Heartbeat(pb.HeartbeatRequest(client_id=raw.client_id, wait_seconds=wait),
                                   metadata=raw.md("Heartbeat"), timeout=wait + 30)
        out.append((time.monotonic(), reply))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_next_round_opens_as_soon_as_the_last_update_is_in(coordinator, admin: Admin, fed_data) -> None:  # type: ignore[no-untyped-def]
    _, eval_file = fed_data
    job = admin.create_job(make_spec(eval_file, rounds=3, clients=2))
    raws = [RawClient(coordinator.address, admin.token(job)) for _ in range(2)]
    state = coordinator.coordinator.state
    for rnd in (1, 2):
        tasks = [r.task() for r in raws]
        assert {t.round for t in tasks} == {rnd}
        for i, (raw, task) in enumerate(zip(raws, tasks, strict=True)):
            _zero_update(raw, task, f"r{rnd}-c{i}")
        wait_until(lambda r=rnd: state.find_round(job, r + 1), timeout=30, interval=0.01, what=f"round {rnd + 1}")
        last_in = max(u.received for u in state.updates(job, rnd))
        gap = state.round(job, rnd + 1).opened - last_in
        # No tick to wait for: aggregation of two tiny updates, then the next round (~10 ms when idle).
        assert 0 <= gap < 0.5, f"round {rnd + 1} opened {gap * 1000:.0f} ms after round {rnd}'s last update"
    # Evaluation and publication of a round ran beside the next, and still landed in its metrics.
    wait_until(lambda: state.round(job, 2).state == "published", timeout=60, what="round 2 published")
    for rnd in (1, 2):
        metrics = state.round(job, rnd).metrics
        assert "eval_loss" in metrics and metrics["aggregated_seconds"] <= metrics["seconds"]
    assert [r for _, r, _, _ in state.published(job)] == [1, 2]
    for raw in raws:
        raw.channel.close()


def test_a_long_poll_answers_when_the_round_opens_and_a_second_one_ends_the_first(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin) -> None:
    job = admin.create_job(make_spec(clients=2))
    first = RawClient(coordinator.address, admin.token(job))
    replies: list[tuple[float, pb.HeartbeatReply]] = []
    older = _long_poll(first, 20, replies)
    time.sleep(0.5)
    newer = _long_poll(first, 20, replies)
    older.join(timeout=5)
    assert not older.is_alive(), "the older long-poll of the same client was not ended by the newer one"
    (_, ended), = replies
    assert ended.action == pb.HeartbeatReply.WAIT and ended.retry_after_seconds == 0
    time.sleep(0.5)
    assert newer.is_alive(), "a long-poll with nothing to do was answered at once"
    # A second client makes the cohort: the held call answers with the task, without polling.
    second = RawClient(coordinator.address, admin.token(job))
    joined = time.monotonic()
    newer.join(timeout=10)
    at, reply = replies[-1]
    assert reply.action == pb.HeartbeatReply.TRAIN and reply.task.round == 1
    assert at - joined < 2.0
    for raw in (first, second):
        raw.channel.close()


def test_leave_releases_the_task_and_the_round_closes_without_its_deadline(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec(rounds=2, clients=3, min_clients=2, deadline=600, cohort_wait=60))
    raws = [RawClient(coordinator.address, admin.token(job)) for _ in range(3)]
    tasks = [r.task() for r in raws]
    state = coordinator.coordinator.state
    _zero_update(raws[0], tasks[0], "a")
    _zero_update(raws[1], tasks[1], "b")
    # Someone else's task: refused, nothing released.
    with pytest.raises(grpc.RpcError) as info:
        raws[2].stub.Leave(pb.LeaveRequest(client_id=raws[2].client_id, task_id=tasks[0].task_id),
                           metadata=raws[2].md("Leave"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == f"task {tasks[0].task_id!r} is not this client's task"
    assert state.round(job, 1).state == "open" and state.released(job, 1) == set()
    # After its update was accepted, a Leave releases nothing: the update stays counted.
    after = raws[0].stub.Leave(pb.LeaveRequest(client_id=raws[0].client_id, task_id=tasks[0].task_id),
                               metadata=raws[0].md("Leave"))
    assert not after.released and "stays counted" in after.message
    left = time.time()
    reply = raws[2].stub.Leave(pb.LeaveRequest(client_id=raws[2].client_id, task_id=tasks[2].task_id,
                                               reason="SIGTERM"), metadata=raws[2].md("Leave"))
    assert reply.released
    wait_until(lambda: state.round(job, 1).state in ("aggregated", "published"), timeout=30, interval=0.01,
               what="round 1 aggregated")
    closed = state.round(job, 1)
    assert closed.closed is not None and closed.closed - left < 5
    assert closed.metrics["contributors"] == 2 and len(closed.cohort) == 3
    assert {u.client_id for u in state.updates(job, 1)} == {raws[0].client_id, raws[1].client_id}
    for raw in raws:
        raw.channel.close()


def test_a_client_that_left_is_replaced_when_too_few_remain(coordinator, admin: Admin) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec(clients=2, min_clients=2, deadline=600))
    a, b = (RawClient(coordinator.address, admin.token(job, uses=3)) for _ in range(2))
    task_a = a.task()
    b.task()
    b.stub.Leave(pb.LeaveRequest(client_id=b.client_id), metadata=b.md("Leave"))
    spare = RawClient(coordinator.address, admin.token(job))
    task = spare.task()  # invited into round 1 at once, not at its deadline
    assert task.round == 1
    _zero_update(a, task_a, "a")
    _zero_update(spare, task, "spare")
    state = coordinator.coordinator.state
    wait_until(lambda: state.job(job).state == "finished", timeout=60, what="the job to finish")
    assert state.round(job, 1).metrics["contributors"] == 2
    for raw in (a, b, spare):
        raw.channel.close()


def test_a_training_client_counts_as_connected(coordinator, admin: Admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, _ = write_synthetic_federation(tmp_path / "data", 1, examples_per_client=64, eval_examples=8)
    job = admin.create_job(make_spec(steps=2000, clients=1))
    agent = spawn("client", "run", "--coordinator", coordinator.address, "--token", admin.token(job), "--data",
                  str(clients[0]), "--state-dir", str(tmp_path / "c0"), "--no-progress", "--insecure",
                  log=tmp_path / "c0.log")
    try:
        wait_until(lambda: "round 1: task" in (tmp_path / "c0.log").read_text(), timeout=120, what="the task")
        # Longer than the presence window (6 heartbeats) with no poll: only the training heartbeat counts.
        time.sleep(8)
        assert coordinator.coordinator.state.updates(job, 1) == [], "training was over before the check"
        status = admin.job(job)
        assert [c.connected for c in status.clients] == [True]
    finally:
        agent.kill()
        agent.wait()


def test_a_sigint_client_leaves_and_its_round_does_not_wait_for_it(coordinator, admin: Admin, fed_data,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    clients, _ = fed_data
    job = admin.create_job(make_spec(steps=400, clients=3, min_clients=2, deadline=600, cohort_wait=120))
    logs = [tmp_path / f"c{i}.log" for i in range(3)]
    agents = [spawn("client", "run", "--coordinator", coordinator.address, "--token", admin.token(job), "--data",
                    str(clients[i]), "--state-dir", str(tmp_path / f"c{i}"), "--no-progress", "--insecure",
                    log=logs[i]) for i in range(3)]
    try:
        wait_until(lambda: "round 1: task" in logs[2].read_text(), timeout=120, what="client 2's task")
        agents[2].send_signal(signal.SIGINT)
        # Exit status 130 as a shell reports it: exit(130), or (when the interrupt lands while the
        # interpreter is already exiting) death by the SIGINT itself, which a shell also shows as 130.
        assert agents[2].wait(timeout=30) in (130, -signal.SIGINT), logs[2].read_text()[-2000:]
        assert "left the job: task" in logs[2].read_text()
        for i in (0, 1):
            assert agents[i].wait(timeout=300) == 0, logs[i].read_text()[-2000:]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    state = coordinator.coordinator.state
    rnd = state.round(job, 1)
    assert state.job(job).state == "finished" and rnd.metrics["contributors"] == 2
    assert len(state.released(job, 1)) == 1
    assert rnd.metrics["aggregated_seconds"] < 300  # the 600 s deadline was not waited out


def test_a_client_given_a_dead_address_exits_5_within_its_connect_timeout(tmp_path: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    clients, _ = fed_data
    port = _free_port()
    t0 = time.monotonic()
    proc = fedtune_cmd("client", "run", "--coordinator", f"127.0.0.1:{port}", "--token", "ftk_x", "--data",
                       str(clients[0]), "--state-dir", str(tmp_path / "c"), "--insecure", "--connect-timeout", "3",
                       timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 5, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedtune: error: gave up after") and "--connect-timeout 3" in last, last
    assert "connection refused" in last
    assert took < 60  # interpreter start and imports included


@pytest.mark.slow
def test_a_coordinator_killed_between_aggregating_and_publishing_a_round_publishes_it_once(  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    # A large evaluation set: round r's evaluation (beside round r+1) takes long enough to kill in.
    clients, eval_file = write_synthetic_federation(tmp_path / "data", 2, examples_per_client=32,
                                                    eval_examples=3000)
    cluster = Cluster(tmp_path, port=_free_port())
    try:
        cluster.start_coordinator()
        job = cluster.create_job(make_spec(eval_file, steps=5, rounds=3, clients=2))
        agents = [cluster.start_client(job, clients[i], i) for i in range(2)]

        def aggregated_not_published() -> bool:
            with cluster.db() as db:
                row = db.execute("SELECT state FROM rounds WHERE job_id=? AND round=1", (job,)).fetchone()
            return row is not None and row[0] == "aggregated"

        wait_until(aggregated_not_published, timeout=180, interval=0.01, what="round 1 aggregated, not published")
        assert cluster.coord is not None
        cluster.coord.send_signal(signal.SIGKILL)
        cluster.coord.wait()
        with cluster.db() as db:
            assert db.execute("SELECT COUNT(*) FROM published WHERE job_id=? AND round=1", (job,)).fetchone()[0] == 0
        cluster.start_coordinator()
        for i, a in enumerate(agents):
            assert a.wait(timeout=300) == 0, cluster.log(f"client-{i}.log")[-3000:]
        status = cluster.status(job)
        assert status["state"] == "finished"
        assert [(r["round"], r["state"]) for r in status["history"]] == [(1, "published"), (2, "published"),
                                                                          (3, "published")]
        assert all("eval_loss" in r["metrics"] for r in status["history"])
        with cluster.db() as db:
            rows = db.execute("SELECT round, COUNT(*) FROM published WHERE job_id=? GROUP BY round", (job,)).fetchall()
        assert rows == [(1, 1), (2, 1), (3, 1)]
        published = sorted(p.name for p in (cluster.state_dir / "adapters" / job).iterdir() if p.is_dir())
        assert [p for p in published if p.startswith("round-")] == ["round-1", "round-2", "round-3"], published
    finally:
        cluster.close()

