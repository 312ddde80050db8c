"""Held long-polls cost no thread: hundreds of signed clients wait at once on a coordinator with a
pool of 8 threads, all get their task as soon as the round opens, other calls answer meanwhile,
and a stop releases every held call within its grace. Real gRPC (the load generator's grpc.aio
clients, each on its own connection), real SQLite."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, load_generator, make_spec

HELD = 300  # far beyond the old 48 held calls and 64 server threads
POOL = 8  # the coordinator's threads for everything else


def _threads() -> int:
    """Threads of this process (the coordinator's included: it runs in-process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count in /proc/self/status")


@pytest.fixture
def small_pool(tmp_path: Path) -> Any:
    running = start(tmp_path / "coord", "127.0.0.1", 0, insecure=True, workers=POOL)
    admin = Admin(running)
    yield running, admin
    admin.channel.close()
    running.stop(grace=0.5)


class Held:
    """``HELD`` enrolled clients, each with one long-poll heartbeat in flight."""

    def __init__(self, load: ModuleType, running: RunningCoordinator, token: str) -> None:
        self.clients = [load.SimClient(running.address, f"held-{i}") for i in range(HELD)]
        self.token = token
        self.load = load
        self.answers: list[tuple[float, pb.HeartbeatReply | grpc.aio.AioRpcError]] = []
        self.calls: list[asyncio.Task[None]] = []

    async def join(self) -> None:
        await self.load.join_all(self.clients, self.token)

    async def _poll(self, c: Any) -> None:
        try:
            reply = await c.stub.Heartbeat(pb.HeartbeatRequest(client_id=c.client_id, wait_seconds=25),
                                           metadata=c.md("Heartbeat"), timeout=60)
        except grpc.aio.AioRpcError as e:
            self.answers.append((time.monotonic(), e))
            return
        self.answers.append((time.monotonic(), reply))

    async def hold(self, settle: float = 2.0) -> None:
        """Starts every long-poll and gives them ``settle`` seconds to reach the coordinator."""
        self.calls = [asyncio.create_task(self._poll(c)) for c in self.clients]
        await asyncio.sleep(settle)

    async def close(self) -> None:
        for task in self.calls:
            task.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


def test_300_held_long_polls_on_8_threads_all_get_their_task_when_the_round_opens(small_pool: Any) -> None:
    running, admin = small_pool
    load = load_generator()
    # One more client than are held: the last to join fills the cohort and opens the round.
    job = admin.create_job(make_spec(clients=HELD + 1, deadline=600))
    token = admin.token(job, uses=HELD + 1)

    async def scenario() -> None:
        held = Held(load, running, token)
        try:
            await held.join()
            before = _threads()
            await held.hold()
            # Every call is held: none was answered at once (a coordinator that ran out of held
            # places would have answered the rest with a WAIT to poll later).
            assert held.answers == [], f"{len(held.answers)} of {HELD} long-polls were answered at once"
            during = _threads()
            assert during - before <= POOL, f"threads {before} -> {during} with {HELD} calls held"
            # Other calls still answer meanwhile, promptly, on the same 8 threads.
            t0 = time.monotonic()
            status = await asyncio.to_thread(admin.job, job)
            took = time.monotonic() - t0
            assert took < 2.0, f"GetJob took {took:.2f}s while {HELD} calls were held"
            assert sum(c.connected for c in status.clients) == HELD  # held clients count as connected
            assert held.answers == []
            # The last client joins: the round opens and every held call answers with its task.
            last = load.SimClient(running.address, "last")
            opened = time.monotonic()
            await last.join(token)
            end = time.monotonic() + 30
            while len(held.answers) < HELD and time.monotonic() < end:
                await asyncio.sleep(0.05)
            replies = [r for _, r in held.answers]
            assert len(replies) == HELD
            assert all(isinstance(r, pb.HeartbeatReply) and r.action == pb.HeartbeatReply.TRAIN
                       and r.task.round == 1 for r in replies), [r for r in replies][:3]
            slowest = max(at for at, _ in held.answers) - opened
            assert slowest < 5.0, f"the last held client got its task {slowest:.2f}s after the round opened"
            # Uploads and downloads work as before, beside the held calls' answers.
            c = held.clients[0]
            task = next(r.task for r in replies if r.task.task_id)  # any task: the adapter is the job's
            adapter = await load._download(c, task.global_adapter.sha256)
            assert len(adapter) == task.global_adapter.size
            await last.close()
        finally:
            await held.close()

    asyncio.run(scenario())


def test_a_stop_releases_every_held_call_within_its_grace(tmp_path: Path) -> None:
    running = start(tmp_path / "coord", "127.0.0.1", 0, insecure=True, workers=POOL)
    admin = Admin(running)
    stopped = False
    try:
        load = load_generator()
        job = admin.create_job(make_spec(clients=HELD + 1, deadline=600))
        token = admin.token(job, uses=HELD)

        async def scenario() -> tuple[float, float, list[Any]]:
            held = Held(load, running, token)
            try:
                await held.join()
                await held.hold()
                assert held.answers == []
                began = time.monotonic()
                stopping = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
                stopping.start()
                end = time.monotonic() + 15
                while len(held.answers) < HELD and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                released = max((at for at, _ in held.answers), default=float("inf")) - began
                await asyncio.to_thread(stopping.join, 15)
                return released, time.monotonic() - began, [r for _, r in held.answers]
            finally:
                await held.close()

        released, stop_seconds, replies = asyncio.run(scenario())
        stopped = True
        assert len(replies) == HELD
        # Each held call is told to ask again (WAIT, retry at once): an agent then finds the next
        # coordinator, or retries this one, without waiting out its long-poll.
        assert all(isinstance(r, pb.HeartbeatReply) and r.action == pb.HeartbeatReply.WAIT
                   and r.retry_after_seconds == 0 for r in replies), [r for r in replies if
                                                                      not isinstance(r, pb.HeartbeatReply)][:3]
        assert released < 3.0, f"held calls were released {released:.2f}s after the stop began"
        assert stop_seconds < 5.0 + 3.0
    finally:
        admin.channel.close()
        if not stopped:
            running.stop(grace=0)
