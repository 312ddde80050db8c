"""Jobs on Ray: one engine actor per job, one compute actor per base and node, one shared copy of the base.

The coordinator process (the Ray driver) keeps the gRPC server, the SQLite state and the blob
store. Each running job's :class:`RoundEngine` runs in its own actor on the coordinator's node
(it opens the state dir's SQLite database, which must stay on a local disk; an engine needs no
CPU and never imports torch) and drives rounds through the same database; heartbeats are answered
by the driver from that database.
The state in SQLite is the engine's checkpoint: every step of a round is a transaction and can be
repeated, so an actor that crashes is replaced by the scheduler (up to ``MAX_RESTARTS`` times) and
the new one resumes the round where it was, while the other jobs go on. (The scheduler restarts it
rather than Ray's ``max_restarts``, which refuses to vouch for constructor arguments that live in
the object store, as the shared base's reference does.)

A job's quota is admitted only on a node where all of it fits, and is reserved there in Ray
(:mod:`fedtune.cluster.placement`). Its compute goes with it: the frozen base is put in the object
store once and reaches each node that needs it through the store; aggregation and CPU evaluation
of every job on a base and node run in that base's compute actor on that node
(:mod:`fedtune.cluster.shared_compute`), which maps the base once and batches evaluations that wait
together; a job's evaluation on GPUs runs as a Ray task inside the job's reservation. Files that
evaluation reads from the coordinator's disk travel through the object store to other nodes
(:mod:`fedtune.cluster.node_files`). A dead compute actor is replaced by the scheduler and the
engines' calls find the new one by name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.cluster.connect import connect
from fedtune.cluster.job_compute import Placement, RayCompute, compute_actor_name
from fedtune.cluster.node_files import NodeFiles, share
from fedtune.cluster.placement import PLACE_WAIT_SECONDS, Reservation, cluster_nodes, on_node, reserve
from fedtune.cluster.scheduler import Demand, Node, Plan, Waiting, place
from fedtune.coordinator.engine import TERMINAL
from fedtune.coordinator.state import Job
from fedtune.errors import FedtuneError
from fedtune.spec import JobSpec

if TYPE_CHECKING:
    from fedtune.coordinator.service import Coordinator

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
SUPERVISE_SECONDS = 1.0
# A reservation Ray has not placed by then (other work holds the node, or the node left) goes back to the queue.
PLACING_GIVE_UP_SECONDS = 60.0


def demand_of(spec: JobSpec) -> Demand:
    """A job's quota."""
    r = spec.resources
    return Demand(r.cpus, r.gpus, r.memory_gb or 0.0)


class JobActor:
    """The body of a job's engine actor (wrapped with ``ray.remote`` by :class:`RayBackend`)."""

    def __init__(self, state_dir: str, job_id: str, base: NodeFiles, base_ref: list[Any], heartbeat_seconds: float,
                 placement: Placement, adapter_config: str) -> None:
        import ray

        from fedtune.coordinator.engine import RoundEngine
        from fedtune.coordinator.keyring import KeyRing
        from fedtune.coordinator.presence import Presence
        from fedtune.coordinator.state import CoordinatorState
        from fedtune.coordinator.store import ArtifactStore

        root = Path(state_dir)
        self.state = CoordinatorState(root / "state.db")
        spec = JobSpec.stored(self.state.job(job_id).spec_json)
        runner = RayCompute(ray, base, base_ref, spec, placement)
        self.engine = RoundEngine(job_id, self.state, ArtifactStore(root / "blobs"),
                                  Presence(heartbeat_seconds, shared=root / "presence.db"), runner,
                                  root / "adapters", KeyRing(root / "keys"), adapter_config=adapter_config)
        self.engine.start()

    def pid(self) -> int:
        """The actor's process id (tests kill it to check restarts)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this engine runs on: the coordinator's, where the state dir is."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def imported(self, module: str) -> bool:
        """Whether this actor's process has imported ``module`` (tests check that engines stay small)."""
        import sys

        return module in sys.modules

    def running(self) -> bool:
        """Whether the engine thread is still driving the job."""
        return self.engine._thread is not None and self.engine._thread.is_alive()

    def wake(self) -> None:
        """Something that can move the job's round happened (see :meth:`RoundEngine.wake`)."""
        self.engine.wake()

    def stop(self) -> None:
        """Stops the engine after its current step."""
        self.engine.stop()


@dataclass
class _Running:
    actor: Any
    demand: Demand
    ping: Any = None
    base_files: NodeFiles | None = None  # a compute actor's base (config and tokenizer)
    base_hash: str = ""
    node_id: str = ""  # where a job's quota is held; where a compute actor runs
    reservation: Reservation | None = None  # a job's quota, held in Ray
    threads_sent: float = -1.0  # a compute actor's last thread budget


class RayBackend:
    """Schedules a coordinator's jobs onto Ray: quotas placed per node, queue, engine actors, restarts."""

    name = "ray"

    def __init__(self, co: Coordinator, address: str | None) -> None:
        self.co = co
        self.ray = connect(address, co.state_dir)
        self.address = address
        self.node_id: str = self.ray.get_runtime_context().get_node_id()  # the coordinator's node
        self._bases: dict[str, Any] = {}
        self._computes: dict[tuple[str, str], _Running] = {}  # by (base hash, node id)
        self._running: dict[str, _Running] = {}
        self._placing: dict[str, tuple[Reservation, float]] = {}  # queued jobs whose quota Ray is placing
        self._queue: dict[str, tuple[int, str]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._actor_cls = self.ray.remote(JobActor)
        from fedtune.cluster.shared_compute import DEFAULT_CONCURRENCY, SharedCompute

        self._compute_cls = self.ray.remote(SharedCompute)
        self._compute_concurrency = DEFAULT_CONCURRENCY
        self._threads_seq = 0
        self._thread = threading.Thread(target=self._supervise, name="ray-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ capacity and queue
    def total(self) -> Demand:
        """What the cluster has in all."""
        r = self.ray.cluster_resources()
        return Demand(float(r.get("CPU", 0.0)), float(r.get("GPU", 0.0)), float(r.get("memory", 0.0)) / 2**30)

    def nodes(self) -> list[Node]:
        """The cluster's live nodes, with what the running and placing jobs leave free on each."""
        used: dict[str, Demand] = {}
        held = [(r.node_id, r.demand) for r in self._running.values()]
        held += [(res.node_id, res.demand) for res, _ in self._placing.values()]
        for node, demand in held:
            used[node] = used.get(node, Demand()) + demand
        return cluster_nodes(self.ray, used)

    def node_of(self, job_id: str) -> str:
        """The node a running job's quota and compute are on."""
        with self._lock:
            return self._running[job_id].node_id

    def queue_place(self, job_id: str) -> tuple[int, str]:
        """(place in line, reason) while queued; (0, '') otherwise."""
        with self._lock:
            return self._queue.get(job_id, (0, ""))

    def submit(self, job_id: str) -> None:
        """Queues a job (new, or running before a restart) and schedules at once."""
        self.schedule()

    def schedule(self) -> None:
        """Starts the queued jobs that can be placed, in the scheduler's order; resumes running ones."""
        with self._lock:
            now = time.time()
            jobs = self.co.state.jobs()
            self._poll_placing(jobs)
            # Running before a coordinator restart: their quotas went with the old process; they are
            # placed again first, and wait in the queue if the cluster no longer has room.
            resumed = [j for j in jobs if j.state == "running" and j.job_id not in self._running
                       and j.job_id not in self._placing]
            if resumed:
                again = place([self._waiting(j, priority=1000) for j in resumed], self.nodes(), now)
                for job in resumed:
                    if job.job_id in again.nodes:
                        self._admit(job, again.nodes[job.job_id])
                    else:
                        self.co.state.set_job_state(job.job_id, "queued")
                jobs = self.co.state.jobs()
            waiting = [self._waiting(j) for j in jobs if j.state == "queued" and j.job_id not in self._placing]
            # Asking Ray for its nodes is a GCS call: only when a job waits (this runs every tick).
            decided = place(waiting, self.nodes(), now) if waiting else Plan([], {})
            for job_id in decided.start:
                self._admit(self.co.state.job(job_id), decided.nodes[job_id])
            placing = [j for j in self._placing if j not in self._running]
            queue = {j: (i + 1, f"placing its quota on node {self._placing[j][0].node_id[:8]}")
                     for i, j in enumerate(placing)}
            for job_id, (where, reason) in decided.queue.items():
                queue[job_id] = (where + len(placing), reason)
            self._queue = queue

    def _waiting(self, job: Job, priority: int | None = None) -> Waiting:
        spec = JobSpec.stored(job.spec_json)
        return Waiting(job.job_id, spec.priority if priority is None else priority, job.created, demand_of(spec))

    def _admit(self, job: Job, node_id: str) -> None:
        """Reserves the job's quota on ``node_id`` and starts it once Ray has placed the reservation."""
        spec = JobSpec.stored(job.spec_json)
        try:
            reservation = reserve(self.ray, demand_of(spec), node_id, f"fedtune-quota-{job.job_id}")
        except self.ray.exceptions.RaySystemError as e:
            # The name is still held by the reservation of a coordinator that just died: the next tick retries.
            log.warning("job %s: cannot reserve its quota yet: %s", job.job_id, str(e).splitlines()[0])
            return
        self._placing[job.job_id] = (reservation, time.monotonic())
        if reservation.ready(self.ray, timeout=PLACE_WAIT_SECONDS):
            self._placed(job.job_id)
        else:
            log.info("job %s: Ray is still placing its quota on node %s", job.job_id, node_id[:8])

    def _placed(self, job_id: str) -> None:
        reservation, _ = self._placing.pop(job_id)
        job = self.co.state.job(job_id)
        if job.state in TERMINAL:
            reservation.release(self.ray)
            return
        if job.state != "running":
            self.co.state.set_job_state(job_id, "running")
        self._start(self.co.state.job(job_id), reservation)

    def _poll_placing(self, jobs: list[Job]) -> None:
        """Starts the jobs whose reservation Ray has placed since; gives up on one that takes too long."""
        states = {j.job_id: j.state for j in jobs}
        for job_id, (reservation, since) in list(self._placing.items()):
            if states.get(job_id, "cancelled") in TERMINAL:
                self._placing.pop(job_id)
                reservation.release(self.ray)
            elif reservation.ready(self.ray):
                self._placed(job_id)
            elif time.monotonic() - since > PLACING_GIVE_UP_SECONDS:
                # Other work holds the node, or it left: back in the queue, to be placed anew.
                self._placing.pop(job_id)
                reservation.release(self.ray)
                log.warning("job %s: Ray did not place its quota on node %s within %.0fs; queued again", job_id,
                            reservation.node_id[:8], PLACING_GIVE_UP_SECONDS)

    def _base_ref(self, job: Job) -> Any:
        if job.base_hash not in self._bases:
            from fedtune.cluster.shared_base import put_base

            self._bases[job.base_hash] = put_base(self.ray, self.co.base_dir(job))
            log.info("base %s put in the object store once for every job on it", job.base_hash[:12])
        return self._bases[job.base_hash]

    def _compute(self, job: Job, node_id: str) -> _Running:
        """The compute actor of the job's base on ``node_id``, started on first use."""
        key = (job.base_hash, node_id)
        if key not in self._computes:
            self._base_ref(job)
            files = share(self.ray, self.co.base_dir(job), self.node_id, node_id, skip_weights=True)
            self._computes[key] = _Running(None, Demand(), base_files=files, base_hash=job.base_hash,
                                           node_id=node_id)
            self._start_compute(key)
        return self._computes[key]

    def _start_compute(self, key: tuple[str, str]) -> None:
        """Starts a base's compute actor on its node; when the dead one's name is not yet free, the next
        tick retries."""
        run = self._computes[key]
        base_hash, node_id = key
        try:
            # No CPU of its own: the jobs' reservations on the node hold it (see shared_compute).
            run.actor = self._compute_cls.options(
                name=compute_actor_name(base_hash, node_id), max_restarts=0, num_cpus=0,
                scheduling_strategy=on_node(node_id), max_concurrency=self._compute_concurrency,
            ).remote(run.base_files, self._bases[base_hash])
        except self.ray.exceptions.ActorAlreadyExistsError:
            log.info("base %s: the dead compute actor's name is not free yet", base_hash[:12])
            return
        run.threads_sent = -1.0
        log.info("base %s: compute actor started on node %s", base_hash[:12], node_id[:8])
        self._size_compute(key)

    def _size_compute(self, key: tuple[str, str]) -> None:
        """Tells a base's compute actor the summed CPU quota of the running jobs on it and its node."""
        run = self._computes.get(key)
        if run is None or run.actor is None:
            return
        # A GPU job's CPU quota is held by its evaluation tasks, not by this actor.
        cpus = sum(r.demand.cpus for r in self._running.values()
                   if (r.base_hash, r.node_id) == key and not r.demand.gpus)
        if cpus != run.threads_sent:
            self._threads_seq += 1
            run.actor.set_threads.remote(cpus, self._threads_seq)
            run.threads_sent = cpus

    def _start(self, job: Job, reservation: Reservation) -> None:
        """Starts the job's engine actor (on this node: it opens the state dir's database); its compute
        goes to the reservation's node. A job whose engine cannot start fails, naming why."""
        from fedtune.coordinator.publish import job_adapter_config

        spec = JobSpec.stored(job.spec_json)
        restarts = self.co.state.engine_restarts(job.job_id)
        node = reservation.node_id
        try:
            compute = self._compute(job, node)
            placement = Placement(node, self.node_id, compute_actor_name(job.base_hash, node), reservation.group)
            assert compute.base_files is not None
            args = (str(self.co.state_dir), job.job_id, compute.base_files, [self._base_ref(job)],
                    self.co.presence.heartbeat_seconds, placement, job_adapter_config(job, spec))
        except FedtuneError as e:
            reservation.release(self.ray)
            self.co.state.set_job_state(job.job_id, "failed", str(e))
            log.error("job %s failed: %s", job.job_id, e)
            return
        actor = self._actor_cls.options(
            name=f"fedtune-engine-{job.job_id}-{restarts}", max_restarts=0, num_cpus=0,
            scheduling_strategy=on_node(self.node_id),
        ).remote(*args)
        self._running[job.job_id] = _Running(actor, demand_of(spec), base_hash=job.base_hash, node_id=node,
                                             reservation=reservation)
        self._size_compute((job.base_hash, node))
        log.info("job %s: engine started (quota %s on node %s)", job.job_id, demand_of(spec).describe(), node[:8])

    def wake(self, job_id: str) -> None:
        """Wakes a running job's engine actor (fire and forget: a dead one is the supervisor's)."""
        with self._lock:
            run = self._running.get(job_id)
        if run is not None:
            run.actor.wake.remote()

    def actor(self, job_id: str) -> Any:
        """The job's engine actor handle."""
        with self._lock:
            return self._running[job_id].actor

    # ------------------------------------------------------------------ supervision
    def _supervise(self) -> None:
        while not self._stop.wait(SUPERVISE_SECONDS):
            try:
                self._reap()
                self.schedule()
            except Exception:  # the supervisor must outlive any one bad step
                log.exception("Ray scheduler step failed")

    def _died(self, run: _Running, probe: str) -> Exception | None:
        """Pings an actor without blocking; the actor error when the last ping found it dead."""
        if run.ping is None:
            run.ping = getattr(run.actor, probe).remote()
            return None
        ready, _ = self.ray.wait([run.ping], timeout=0)
        if not ready:
            return None
        ping, run.ping = run.ping, None
        try:
            self.ray.get(ping)
        except self.ray.exceptions.RayActorError as e:
            return e
        return None

    def _requeue_from_lost_nodes(self) -> None:
        """Jobs whose node left the cluster go back to the queue, to be placed again (their engines
        resume from the checkpoint in SQLite); that node's compute actors are forgotten."""
        alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        for job_id, run in list(self._running.items()):
            if run.node_id in alive:
                continue
            self._release(job_id)
            if self.co.state.job(job_id).state not in TERMINAL:
                self.co.state.set_job_state(job_id, "queued", f"its node {run.node_id[:8]} left the Ray cluster")
                log.warning("job %s: its node %s left the Ray cluster; queued to be placed again", job_id,
                            run.node_id[:8])
        for key in [k for k in self._computes if k[1] not in alive]:
            del self._computes[key]

    def _reap(self) -> None:
        with self._lock:
            self._requeue_from_lost_nodes()
            for job_id, run in list(self._running.items()):
                job = self.co.state.job(job_id)
                if job.state in TERMINAL:
                    self._release(job_id)
                    continue
                error = self._died(run, "running")
                if error is None:
                    continue
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if self.co.state.engine_restarts(job_id) >= MAX_RESTARTS:
                    self._release(job_id)
                    self.co.state.set_job_state(job_id, "failed", f"job engine died {MAX_RESTARTS + 1} times; "
                                                f"last: {reason}")
                    log.error("job %s failed: its engine died %d times", job_id, MAX_RESTARTS + 1)
                    continue
                # The job keeps its reservation: the new engine's compute is where the old one's was.
                self._running.pop(job_id)
                self.ray.kill(run.actor, no_restart=True)
                restarts = self.co.state.count_engine_restart(job_id)
                log.warning("job %s: engine died (%s); restart %d of %d resumes from its checkpoint", job_id,
                            reason, restarts, MAX_RESTARTS)
                assert run.reservation is not None
                self._start(self.co.state.job(job_id), run.reservation)
            for key, run in list(self._computes.items()):
                if run.actor is None:
                    self._start_compute(key)
                elif self._died(run, "pid") is not None:
                    # Its state is caches only: a new one rebuilds them; engines find it by name.
                    log.warning("base %s: compute actor on node %s died; starting a new one", key[0][:12],
                                key[1][:8])
                    run.actor = None
                    self._start_compute(key)

    def _release(self, job_id: str) -> None:
        """Stops a job's engine, frees what its compute kept and gives its quota back."""
        run = self._running.pop(job_id, None)
        if run is None:
            return
        self.ray.kill(run.actor, no_restart=True)
        compute = self._computes.get((run.base_hash, run.node_id))
        if compute is not None and compute.actor is not None:
            compute.actor.release.remote(job_id)
        if run.reservation is not None:
            run.reservation.release(self.ray)
        self._size_compute((run.base_hash, run.node_id))

    def cancel(self, job_id: str) -> None:
        """Stops a job's actor (the caller marks the job cancelled first)."""
        with self._lock:
            self._release(job_id)
            placing = self._placing.pop(job_id, None)
            if placing is not None:
                placing[0].release(self.ray)
            self._queue.pop(job_id, None)

    def stop(self) -> None:
        """Stops scheduling and every engine actor; shuts Ray down."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for job_id in list(self._running):
                self._release(job_id)
            for reservation, _ in self._placing.values():
                reservation.release(self.ray)
            for run in self._computes.values():
                if run.actor is not None:
                    self.ray.kill(run.actor, no_restart=True)
        self.ray.shutdown()
