"""Jobs on Ray: one engine actor per job, one compute actor per base, one shared copy of the base.

The coordinator process (the Ray driver) keeps the gRPC server, the SQLite state and the blob
store. Each running job's :class:`RoundEngine` runs in its own actor on the coordinator's node and
drives rounds through the same database; heartbeats are answered by the driver from that database.
The state in SQLite is the engine's checkpoint: every step of a round is a transaction and can be
repeated, so an actor that crashes is replaced by the scheduler (up to ``MAX_RESTARTS`` times) and
the new one resumes the round where it was, while the other jobs go on. (The scheduler restarts it
rather than Ray's ``max_restarts``, which refuses to vouch for constructor arguments that live in
the object store, as the shared base's reference does.)

The frozen base is put in the object store once per base. Aggregation and CPU evaluation of every
job on a base run in that base's compute actor (:mod:`fedtune.cluster.shared_compute`), which maps
the base once and batches evaluations that wait together; a job's evaluation on GPUs runs as a Ray
task holding the job's GPUs (and memory) over the same shared base. A dead compute actor is
replaced by the scheduler and the engines' calls find the new one by name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.cluster.connect import connect, this_node_resource
from fedtune.cluster.scheduler import Demand, Waiting, plan
from fedtune.coordinator.engine import TERMINAL
from fedtune.coordinator.state import Job
from fedtune.errors import FedtuneError
from fedtune.spec import JobSpec
from fedtune.strategies.base import StrategyRun

if TYPE_CHECKING:
    from fedtune.coordinator.service import Coordinator
    from fedtune.privacy import DpNoise
    from fedtune.tensor_blobs import Schema

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
SUPERVISE_SECONDS = 1.0
# Jobs whose evaluation models one worker keeps (skeletons over the shared base: small).
_WORKER_JOBS = 8
# Pins actors and tasks to the coordinator's node (its state dir and files are local) without
# taking a visible share of that node's custom resource.
_PIN = 0.001


def demand_of(spec: JobSpec) -> Demand:
    """A job's quota."""
    r = spec.resources
    return Demand(r.cpus, r.gpus, r.memory_gb or 0.0)


# ---------------------------------------------------------------------------------- in workers
_evaluators: OrderedDict[str, Any] = OrderedDict()


def _evaluate_task(job: Job, base_dir: str, base_refs: dict[str, Any], adapter: bytes | None,
                   use_gpu: bool) -> dict[str, float]:
    """A Ray task: evaluates ``adapter`` (safetensors bytes) on ``job``'s eval data over the shared base."""
    import ray
    import torch

    from fedtune.cluster.shared_base import build_from_shared, get_base
    from fedtune.coordinator.evaluator import Evaluator
    from fedtune.peft_io import bytes_to_tensors

    device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    key = f"{job.job_id}:{device}"
    evaluator = _evaluators.get(key)
    if evaluator is None:
        arrays = get_base(ray, base_refs)
        evaluator = Evaluator(lambda _job: Path(base_dir), device,
                              load_base=lambda d, dev: build_from_shared(d, arrays, dev))
        _evaluators[key] = evaluator
        while len(_evaluators) > _WORKER_JOBS:
            _evaluators.popitem(last=False)
    _evaluators.move_to_end(key)
    metrics: dict[str, float] = evaluator.evaluate(job, None if adapter is None else bytes_to_tensors(adapter))
    return metrics


# A call to a base's compute actor: how long it may take, and how long to wait for a replacement.
CALL_TIMEOUT_SECONDS = float(os.environ.get("FEDTUNE_COMPUTE_TIMEOUT_SECONDS", "3600"))
REPLACEMENT_WAIT_SECONDS = 60.0


def compute_actor_name(base_hash: str) -> str:
    """The Ray name of a base's compute actor."""
    return f"fedtune-compute-{base_hash[:16]}"


class RayCompute:
    """A job's aggregation and evaluation: in its base's compute actor, on GPUs as Ray tasks."""

    def __init__(self, ray: Any, base_dir: str, base_ref: list[Any], spec: JobSpec, pin: str,
                 compute_name: str) -> None:
        self.ray = ray
        self.base_dir = base_dir
        self.base_ref = base_ref  # a list, so Ray passes the reference on instead of resolving it here
        self.compute: Any = None  # found by name, again after a replacement
        self.compute_name = compute_name
        res = spec.resources
        self.use_gpu = res.gpus > 0
        options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "resources": {pin: _PIN},
                                   "max_retries": 2}
        if res.memory_gb:
            options["memory"] = int(res.memory_gb * 2**30)
        self._evaluate_gpu = ray.remote(_evaluate_task).options(**options)

    def _call(self, method: str, *args: Any) -> Any:
        """Calls the compute actor; when it has died, waits for the scheduler's replacement."""
        deadline = time.monotonic() + REPLACEMENT_WAIT_SECONDS
        while True:
            try:
                if self.compute is None:
                    self.compute = self.ray.get_actor(self.compute_name)
                return self.ray.get(getattr(self.compute, method).remote(*args), timeout=CALL_TIMEOUT_SECONDS)
            except (self.ray.exceptions.RayActorError, ValueError) as e:  # ValueError: no actor by that name yet
                self.compute = None
                if time.monotonic() > deadline:
                    raise FedtuneError(f"the compute actor {self.compute_name} is gone and no replacement "
                                       f"came within {REPLACEMENT_WAIT_SECONDS:.0f}s") from e
                time.sleep(1.0)

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: StrategyRun, dp: DpNoise | None, lora: Any = None,
                  after: Any = None) -> tuple[bytes, bytes | None]:
        result: tuple[bytes, bytes | None] = self._call("aggregate", global_in, plains, weights, codec, schema,
                                                        strategy, dp, lora, after)
        return result

    def aggregate_sum(self, global_in: bytes, total: Any, schema: Schema, clip: float, dp: DpNoise | None,
                      after: Any = None, strategy: StrategyRun | None = None) -> tuple[bytes, bytes | None]:
        result: tuple[bytes, bytes | None] = self._call("aggregate_sum", global_in, total, schema, clip, dp, after,
                                                        strategy)
        return result

    def evaluate(self, job: Job, adapter: bytes | None) -> dict[str, float]:
        if self.use_gpu:
            gpu: dict[str, float] = self.ray.get(
                self._evaluate_gpu.remote(job, self.base_dir, self.base_ref[0], adapter, True),
                timeout=CALL_TIMEOUT_SECONDS)
            return gpu
        result: dict[str, float] = self._call("evaluate", job, adapter)
        return result

    def release(self, job_id: str) -> None:
        """The compute actor drops the job's models (GPU task workers evict theirs by LRU)."""
        self._call("release", job_id)


class JobActor:
    """The body of a job's engine actor (wrapped with ``ray.remote`` by :class:`RayBackend`)."""

    def __init__(self, state_dir: str, job_id: str, base_dir: str, base_ref: list[Any], heartbeat_seconds: float,
                 pin: str, adapter_config: str, compute_name: str) -> None:
        import ray

        from fedtune.coordinator.engine import RoundEngine
        from fedtune.coordinator.keyring import KeyRing
        from fedtune.coordinator.presence import Presence
        from fedtune.coordinator.state import CoordinatorState
        from fedtune.coordinator.store import ArtifactStore

        root = Path(state_dir)
        self.state = CoordinatorState(root / "state.db")
        spec = JobSpec.stored(self.state.job(job_id).spec_json)
        runner = RayCompute(ray, base_dir, base_ref, spec, pin, compute_name)
        self.engine = RoundEngine(job_id, self.state, ArtifactStore(root / "blobs"),
                                  Presence(heartbeat_seconds, shared=root / "presence.db"), runner,
                                  root / "adapters", KeyRing(root / "keys"), adapter_config=adapter_config)
        self.engine.start()

    def pid(self) -> int:
        """The actor's process id (tests kill it to check restarts)."""
        return os.getpid()

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
    base_dir: str = ""  # a compute actor's base
    base_hash: str = ""  # an engine's base
    threads_sent: float = -1.0  # a compute actor's last thread budget


class RayBackend:
    """Schedules a coordinator's jobs onto Ray: quotas, queue, engine actors, restarts."""

    name = "ray"

    def __init__(self, co: Coordinator, address: str | None) -> None:
        self.co = co
        self.ray = connect(address, co.state_dir)
        self.address = address
        self.pin = this_node_resource(self.ray)
        self._bases: dict[str, Any] = {}
        self._computes: dict[str, _Running] = {}  # by base hash
        self._running: dict[str, _Running] = {}
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

    def queue_place(self, job_id: str) -> tuple[int, str]:
        """(place in line, reason) while queued; (0, '') otherwise."""
        with self._lock:
            return self._queue.get(job_id, (0, ""))

    def submit(self, job_id: str) -> None:
        """Queues a job (new, or running before a restart) and schedules at once."""
        self.schedule()

    def schedule(self) -> None:
        """Starts the queued jobs that fit, in the scheduler's order; resumes running ones."""
        with self._lock:
            jobs = self.co.state.jobs()
            for job in jobs:
                if job.state == "running" and job.job_id not in self._running:
                    self._start(job)  # running before a coordinator restart: its quota was granted
            used = sum((r.demand for r in self._running.values()), Demand())
            specs = {j.job_id: JobSpec.stored(j.spec_json) for j in jobs if j.state == "queued"}
            waiting = [Waiting(j.job_id, specs[j.job_id].priority, j.created, demand_of(specs[j.job_id]))
                       for j in jobs if j.job_id in specs]
            total = self.total()
            decided = plan(waiting, total - used, total, time.time())
            for job_id in decided.start:
                self.co.state.set_job_state(job_id, "running")
                self._start(self.co.state.job(job_id))
            self._queue = decided.queue

    def _base_ref(self, job: Job) -> Any:
        if job.base_hash not in self._bases:
            from fedtune.cluster.shared_base import put_base

            self._bases[job.base_hash] = put_base(self.ray, self.co.base_dir(job))
            log.info("base %s put in the object store once for every job on it", job.base_hash[:12])
        return self._bases[job.base_hash]

    def _compute(self, job: Job) -> str:
        """The name of the compute actor of the job's base, started on first use."""
        if job.base_hash not in self._computes:
            self._base_ref(job)
            self._computes[job.base_hash] = _Running(None, Demand(), base_dir=str(self.co.base_dir(job)))
            self._start_compute(job.base_hash)
        return compute_actor_name(job.base_hash)

    def _start_compute(self, base_hash: str) -> None:
        """Starts the base's compute actor; when the dead one's name is not yet free, the next tick retries."""
        run = self._computes[base_hash]
        try:
            run.actor = self._compute_cls.options(
                name=compute_actor_name(base_hash), max_restarts=0, num_cpus=0, resources={self.pin: _PIN},
                max_concurrency=self._compute_concurrency,
            ).remote(run.base_dir, self._bases[base_hash])
        except self.ray.exceptions.ActorAlreadyExistsError:
            log.info("base %s: the dead compute actor's name is not free yet", base_hash[:12])
            return
        run.threads_sent = -1.0
        log.info("base %s: compute actor started", base_hash[:12])
        self._size_compute(base_hash)

    def _size_compute(self, base_hash: str) -> None:
        """Tells the base's compute actor the summed CPU quota of the running jobs on it."""
        run = self._computes.get(base_hash)
        if run is None or run.actor is None:
            return
        # A GPU job's CPU quota is held by its evaluation tasks, not by this actor.
        cpus = sum(r.demand.cpus for r in self._running.values() if r.base_hash == base_hash and not r.demand.gpus)
        if cpus != run.threads_sent:
            self._threads_seq += 1
            run.actor.set_threads.remote(cpus, self._threads_seq)
            run.threads_sent = cpus

    def _start(self, job: Job) -> None:
        """Starts the job's engine actor; a job whose engine cannot start fails, naming why."""
        from fedtune.coordinator.publish import job_adapter_config

        spec = JobSpec.stored(job.spec_json)
        restarts = self.co.state.engine_restarts(job.job_id)
        try:
            args = (str(self.co.state_dir), job.job_id, str(self.co.base_dir(job)), [self._base_ref(job)],
                    self.co.presence.heartbeat_seconds, self.pin, job_adapter_config(job, spec),
                    self._compute(job))
        except FedtuneError as e:
            self.co.state.set_job_state(job.job_id, "failed", str(e))
            log.error("job %s failed: %s", job.job_id, e)
            return
        actor = self._actor_cls.options(
            name=f"fedtune-engine-{job.job_id}-{restarts}", max_restarts=0, num_cpus=0,
            resources={self.pin: _PIN},
        ).remote(*args)
        self._running[job.job_id] = _Running(actor, demand_of(spec), base_hash=job.base_hash)
        self._size_compute(job.base_hash)
        log.info("job %s: engine started (quota %s)", job.job_id, demand_of(spec).describe())

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

    def _reap(self) -> None:
        with self._lock:
            for job_id, run in list(self._running.items()):
                job = self.co.state.job(job_id)
                if job.state in TERMINAL:
                    self._release(job_id)
                    continue
                error = self._died(run, "running")
                if error is None:
                    continue
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self._release(job_id)
                if self.co.state.engine_restarts(job_id) >= MAX_RESTARTS:
                    self.co.state.set_job_state(job_id, "failed", f"job engine died {MAX_RESTARTS + 1} times; "
                                                f"last: {reason}")
                    log.error("job %s failed: its engine died %d times", job_id, MAX_RESTARTS + 1)
                    continue
                restarts = self.co.state.count_engine_restart(job_id)
                log.warning("job %s: engine died (%s); restart %d of %d resumes from its checkpoint", job_id,
                            reason, restarts, MAX_RESTARTS)
                self._start(self.co.state.job(job_id))
            for base_hash, run in list(self._computes.items()):
                if run.actor is None:
                    self._start_compute(base_hash)
                elif self._died(run, "pid") is not None:
                    # Its state is caches only: a new one rebuilds them; engines find it by name.
                    log.warning("base %s: compute actor died; starting a new one", base_hash[:12])
                    run.actor = None
                    self._start_compute(base_hash)

    def _release(self, job_id: str) -> None:
        run = self._running.pop(job_id, None)
        if run is not None:
            self.ray.kill(run.actor, no_restart=True)
            compute = self._computes.get(run.base_hash)
            if compute is not None and compute.actor is not None:
                compute.actor.release.remote(job_id)
            self._size_compute(run.base_hash)

    def cancel(self, job_id: str) -> None:
        """Stops a job's actor (the caller marks the job cancelled first)."""
        with self._lock:
            self._release(job_id)
            self._queue.pop(job_id, None)

    def stop(self) -> None:
        """Stops scheduling and every engine actor; shuts Ray down."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for job_id in list(self._running):
                self._release(job_id)
            for run in self._computes.values():
                if run.actor is not None:
                    self.ray.kill(run.actor, no_restart=True)
        self.ray.shutdown()
