"""The simulation's worker pool: long-lived Ray actors that run virtual clients one after another.

Ray kills idle task workers between rounds, and each fresh worker spends seconds importing torch,
transformers and peft before its client trains. Here a fixed pool of actors is started once; each
imports the training libraries when it starts and keeps the model the last virtual client loaded
(:mod:`fedtune.simulation.shared_model`), then runs group after group of virtual clients
(:func:`fedtune.simulation.batched.run_group`: fresh agents on the clients' own state dirs, so a
dormant client still costs only its state dir). What runs where is :class:`CohortQueue`'s call.

Workers can warm up in stages (``warm_at_once``, then one more at a time while clients wait), and a
client only goes to a worker whose imports are done. Importing torch takes seconds of CPU per
process: eight processes importing at once on two cores hold the first round up for all of them,
where two warm workers would already run clients while the next imports; but workers still
importing in later rounds slow those rounds, so the simulation starts them all at once by default.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.simulation.schedule import ClientResources, CohortQueue

log = logging.getLogger(__name__)

# How often a worker that died (killed for memory, a crash) is replaced before the simulation gives up.
DEFAULT_MAX_REPLACEMENTS = int(os.environ.get("FEDTUNE_SIM_MAX_REPLACEMENTS", "8"))
RESULT_TIMEOUT_SECONDS = 30.0


class ClientWorker:
    """One worker process of the pool; made a Ray actor where the pool starts it."""

    def __init__(self, log_level: int = logging.WARNING) -> None:
        """Imports the training libraries now, while the coordinator starts and clients enroll."""
        # A virtual client's per-task lines ("round 3: task ...") are the round table's business.
        logging.getLogger("fedtune").setLevel(log_level)
        from fedtune.client.agent import _import_training_libraries

        _import_training_libraries()
        import fedtune.simulation.batched  # noqa: F401 - torch, the agent and the batching code

    def ready(self) -> int:
        """Answers once the imports are done: the worker's process id."""
        return os.getpid()

    def run_group(self, address: str, members: list[tuple[str, str]], idle_seconds: float) -> dict[str, Any]:
        """Runs one round of each member (data file, state dir); see :func:`run_group`."""
        import ray

        from fedtune.simulation.batched import run_group
        from fedtune.simulation.shared_model import SHARED

        out = run_group(address, members, idle_seconds)
        return {**out, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "model_builds": SHARED.builds}


class WorkerPool:
    """The actors, and the groups of virtual clients they are running."""

    def __init__(self, ray: Any, size: int, resources: ClientResources, batch_clients: int,
                 log_level: int = logging.WARNING, warm_at_once: int = 1) -> None:
        """Starts ``warm_at_once`` of the ``size`` actors (``resources`` each); the rest start as needed."""
        self._ray = ray
        self._actor_class = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_restarts=0,
                                       max_concurrency=1)(ClientWorker)
        self._log_level = log_level
        self.size = size
        self.queue = CohortQueue(0, batch_clients)
        self._actors: list[Any] = []
        self._warming: dict[Any, int] = {}  # ready() ref -> worker
        self._calls: dict[Any, tuple[int, float]] = {}  # run_group ref -> (worker, when it was handed out)
        self.replaced = 0
        self.pids: set[int] = set()
        self.runs = 0  # virtual-client runs done
        # Per group run: worker, pid, Ray node, clients, models built so far, when it was handed out and seen done.
        self.history: list[dict[str, Any]] = []
        for _ in range(max(1, min(warm_at_once, size))):
            self._start_actor(len(self._actors))

    def _start_actor(self, worker: int) -> None:
        actor = self._actor_class.remote(self._log_level)
        if worker == len(self._actors):
            self._actors.append(actor)
        else:
            self._actors[worker] = actor
        self._warming[actor.ready.remote()] = worker

    def submit(self, clients: list[str]) -> None:
        """Queues clients to run as soon as a worker is free."""
        self.queue.enqueue(clients)

    def busy(self) -> set[str]:
        """Clients queued or running."""
        return self.queue.busy()

    def running(self) -> bool:
        """Whether some worker is running a group now."""
        return bool(self._calls)

    def pending(self) -> bool:
        """Whether :meth:`collect` has anything to wait for (a group running, a worker warming up)."""
        return bool(self._calls or self._warming)

    def start(self, address: str, members: dict[str, tuple[str, str]], idle_seconds: float) -> None:
        """Starts the waiting clients on free workers; ``members`` maps a client to (data, state dir).

        While clients wait and no worker is warming up, one more worker starts (up to the pool size).
        """
        for worker, group in self.queue.dispatch():
            ref = self._actors[worker].run_group.remote(address, [members[c] for c in group], idle_seconds)
            self._calls[ref] = (worker, time.time())
        if self.queue.waiting() and not self._warming and len(self._actors) < self.size:
            self._start_actor(len(self._actors))

    def collect(self, timeout: float) -> list[tuple[list[str], dict[str, Any] | Exception]]:
        """Waits up to ``timeout`` for a group to end (or a worker to be ready); returns each group
        that has ended by then, with its result or error.

        Returns as soon as the first one ends, with every other one that has ended too, so that a
        freed worker takes the next waiting client at once.
        """
        pending = [*self._calls, *self._warming]
        if not pending:
            return []
        done, rest = self._ray.wait(pending, num_returns=1, timeout=timeout)
        if done and rest:
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        out: list[tuple[list[str], dict[str, Any] | Exception]] = []
        for ref in done:
            if ref in self._warming:
                worker = self._warming.pop(ref)
                try:
                    self._ray.get(ref, timeout=RESULT_TIMEOUT_SECONDS)
                except Exception as e:  # noqa: BLE001 - a worker that cannot start is replaced, within bounds
                    self._replace(worker, e)
                    continue
                self.queue.add_worker(worker)
                continue
            worker, handed = self._calls.pop(ref)
            try:
                result = self._ray.get(ref, timeout=RESULT_TIMEOUT_SECONDS)
            except Exception as e:  # noqa: BLE001 - a failed group is its clients' dropout; the worker may be gone
                from ray.exceptions import ActorDiedError

                dead = isinstance(e, ActorDiedError)
                out.append((self.queue.finished(worker, free=not dead), e))
                if dead:
                    self._replace(worker, e)
                continue
            group = self.queue.finished(worker)
            self.pids.add(result["pid"])
            self.runs += len(group)
            self.history.append({"worker": worker, "pid": result["pid"], "node_id": result["node_id"],
                                 "clients": group, "model_builds": result["model_builds"],
                                 "started": handed, "ended": time.time()})
            out.append((group, result))
        return out

    def _replace(self, worker: int, error: Exception) -> None:
        if self.replaced >= DEFAULT_MAX_REPLACEMENTS:
            raise FedtuneError(f"{self.replaced} simulation workers died (last: {error}); giving up "
                               "(killed for memory? try fewer with --workers or more --client-resources cpus)")
        log.warning("simulation worker %d died (%s); starting another", worker, str(error).splitlines()[0])
        self._start_actor(worker)
        self.replaced += 1

    def stop(self) -> None:
        """Ends the actors (their processes go; what the clients wrote stays in their state dirs)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
