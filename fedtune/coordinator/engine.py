"""The round engine: one per job, a thread that drives rounds from cohort to publication.

Every transition is a transaction in :class:`CoordinatorState`, and each step can be repeated
after a crash: an open round keeps collecting, a closing round is aggregated again from its
durable updates (aggregation is deterministic), and publication replaces a half-written directory.

Rounds are event-driven: the service wakes the engine when something that can move a round
happens (an accepted update, a join, a leave, a SecAgg message), and otherwise it sleeps until the
nearest deadline (at most ``IDLE_SECONDS``). The next round opens as soon as the aggregate exists:
the evaluation and publication of round r run on a publisher thread beside round r+1. Between the
two, round r is ``aggregated`` in the state (its global adapter and strategy state are durable and
round r+1 trains on them); a coordinator that stops there publishes r when it starts again, once.
The last round is evaluated and published before the job is marked finished.

The engine moves adapters as safetensors bytes and leaves tensor work to its :class:`Compute`, so
on Ray an engine actor does not import torch. Under secure aggregation the engine unmasks the
round's sum itself (numpy and cryptography only) and hands the decoded vector to its Compute.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.coordinator.keyring import KeyRing
from fedtune.coordinator.offsite import plan_for
from fedtune.coordinator.presence import Presence
from fedtune.coordinator.publish import MANIFEST, job_adapter_config, publish_adapter
from fedtune.coordinator.state import CoordinatorState, Job, Round, SecAggRound, Update
from fedtune.coordinator.store import ArtifactStore
from fedtune.crypto.envelope import UpdateBinding
from fedtune.methods import get_method
from fedtune.methods.base import METHOD_METRICS_METADATA, AfterAggregate
from fedtune.methods.lora import PRODUCT_ERROR_METADATA, LoraAggregation, declared_rank, travelling
from fedtune.privacy import DpNoise, RdpAccountant
from fedtune.registry.lineage import publication_lineage
from fedtune.spec import JobSpec
from fedtune.strategies.base import StrategyRun
from fedtune.tensor_blobs import metadata as blob_metadata
from fedtune.tensor_blobs import shapes

if TYPE_CHECKING:
    from fedtune.coordinator.compute import Compute

log = logging.getLogger(__name__)

# Longest sleep with nothing waking the engine: bounds how late a client that went quiet (no
# heartbeats: no event) is noticed, and a cohort's wait for late joiners.
IDLE_SECONDS = 1.0
TERMINAL = ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class Decision:
    """What a polling client is told: wait, train (with its task id and round), evaluate a published
    round's adapter, a secure-aggregation step (``step``: a serialized SecAggStep), or stop.
    ``global_in``: async mode, the version a task trains on (else the round's)."""

    action: str  # wait, train, evaluate, secagg, stop
    round: int = 0
    task_id: str = ""
    message: str = ""
    step: bytes = b""
    retry_after: float | None = None
    global_in: str = ""


class RoundEngine:
    """Drives one job's rounds. ``poll`` answers heartbeats; a thread runs ``tick`` in a loop."""

    def __init__(
        self,
        job_id: str,
        state: CoordinatorState,
        store: ArtifactStore,
        presence: Presence,
        compute: Compute,
        adapters_root: Path,
        keys: KeyRing,
        adapter_config: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.state = state
        self.store = store
        self.presence = presence
        self.compute = compute
        self.adapters_root = adapters_root
        self.keys = keys
        # The published adapter_config.json, when computed elsewhere (Ray engines run without peft).
        self.adapter_config = adapter_config
        job = state.job(job_id)
        self.spec = JobSpec.stored(job.spec_json)
        # The spec names a known codec and strategy (checked when the job was created).
        self.schema = shapes(store.read(job.initial_adapter))
        # LoRA jobs: what clients send under the job's aggregation.lora (ffa: B only).
        self.lora_rank: int | None = getattr(self.spec.peft, "r", None) if get_method(self.spec.peft.method).lora \
            and not self.spec.tunes_blocks else None
        self.wire_schema = travelling(self.schema, self.spec.aggregation.lora) if self.lora_rank else self.schema
        self.secure: Any = None
        if self.spec.secure_aggregation:
            from fedtune.coordinator.secure_round import SecureRound

            self.secure = SecureRound(job_id, self.spec, state, store, keys, self.wire_schema)
        self.accountant = (RdpAccountant.from_dict(json.loads(job.privacy_json)) if job.privacy_json
                           else RdpAccountant())
        self.asynchronous = self.spec.aggregation.mode == "async"
        self._ready_since: float | None = None
        self._cohort_cache: tuple[int, frozenset[str]] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Called after every change a client could be waiting for (long-polls wake on it).
        self._listeners: list[Callable[[], None]] = []
        # Rounds aggregated but not yet evaluated and published (0: the base's evaluation), in order.
        self._publish: queue.Queue[int | None] = queue.Queue()
        self._publisher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the engine thread and the publisher (which first publishes what a stop left
        aggregated but unpublished, and evaluates the base if that was never done)."""
        job = self.state.job(self.job_id)
        if job.base_eval_json is None:
            self._publish.put(0)
        for r in self.state.rounds(self.job_id):
            if r.state == "aggregated":
                self._publish.put(r.round)
        self._publisher = threading.Thread(target=self._run_publisher, name=f"publish-{self.job_id}", daemon=True)
        self._publisher.start()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Asks the threads to stop after their current step and waits for them."""
        self._stop.set()
        self._wake.set()
        self._publish.put(None)
        for thread in (self._thread, self._publisher):
            if thread is not None:
                thread.join(timeout)

    def wake(self) -> None:
        """Something that can move a round happened (an update, a join, a leave): look now."""
        self._wake.set()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls ``listener`` (from the engine's threads) after every change a client may wait for."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def fingerprint(self) -> tuple[object, ...]:
        """What a waiting client's next answer depends on: changes exactly when a poll may answer
        differently (a round opened or closed, a SecAgg phase moved, a round published, the job ended)."""
        job = self.state.job(self.job_id)
        rnd = self.state.find_round(self.job_id, job.current_round)
        sec = self.state.secagg_round(self.job_id, job.current_round) if self.secure is not None else None
        published = self.state.published_count(self.job_id) if self.spec.evaluation.clients else 0
        return (job.state, job.current_round, rnd.state if rnd else None, len(rnd.cohort) if rnd else 0,
                (sec.attempt, sec.phase) if sec else None, published)

    def _run(self) -> None:
        # One fingerprint per step: the one after a step is the one before the next. A change made
        # by another thread in between (an admin cancelling) then counts as this step's: one more
        # wake-up for the waiting clients, never one fewer.
        before: tuple[object, ...] | None = None
        while not self._stop.is_set():
            self._wake.clear()
            progressed = False
            try:
                if before is None:
                    before = self.fingerprint()
                if not self.tick():
                    self._changed()
                    return
                after = self.fingerprint()
                if after != before:
                    progressed = True
                    self._changed()
                before = after
            except Exception as e:  # a bug or a broken base model: the job fails visibly, the service lives
                log.exception("job %s failed", self.job_id)
                self._fail(e)
                return
            if not progressed:
                self._wake.wait(self._sleep_seconds())

    def _fail(self, e: Exception) -> None:
        self.state.set_job_state(self.job_id, "failed", f"{type(e).__name__}: {e}")
        self._changed()

    def _sleep_seconds(self) -> float:
        """Until the nearest time-driven step (a round's deadline, the end of a cohort's wait), at
        most IDLE_SECONDS."""
        now = time.time()
        wake_at = now + IDLE_SECONDS
        job = self.state.job(self.job_id)
        rnd = self.state.find_round(self.job_id, job.current_round)
        if rnd is not None and rnd.state == "open":
            wake_at = min(wake_at, rnd.deadline)
        if self._ready_since is not None:
            wake_at = min(wake_at, self._ready_since + self.spec.cohort_wait_seconds)
        return max(0.0, wake_at - now)

    # ------------------------------------------------------------------ heartbeats
    def poll(self, client_id: str) -> Decision:
        """What a client should do now."""
        job = self.state.job(self.job_id)
        due = self._evaluation_due(job, client_id)
        if due is not None:
            return Decision("evaluate", round=due)
        if job.state in TERMINAL:
            return Decision("stop", message=f"job {self.job_id} is {job.state}")
        rnd = self.state.find_round(self.job_id, job.current_round)
        if rnd is None or rnd.state != "open":
            # Between rounds the next task is imminent for the last cohort: it polls faster than the
            # heartbeat (when its heartbeat is not held as a long-poll); everyone else at the heartbeat.
            fast = rnd is not None or client_id in self._previous_cohort(job.current_round)
            return Decision("wait", message="waiting for the next round", retry_after=0.3 if fast else None)
        if self.asynchronous:
            # FedBuff: whoever asks trains on the newest version; one update per client per buffer.
            if self.state.has_update(self.job_id, rnd.round, client_id):
                return Decision("wait", message=f"update counted for version {rnd.round}; waiting for the next",
                                retry_after=0.3)
            return Decision("train", round=rnd.round, task_id=self.state.ensure_task(self.job_id, rnd.round, client_id))
        if client_id not in rnd.cohort:
            return Decision("wait", message=f"not in the cohort of round {rnd.round}")
        task_id = self.state.task_for(self.job_id, rnd.round, client_id) or ""
        if self.secure is not None:
            return self._poll_secure(rnd, client_id, task_id)
        if self.state.has_update(self.job_id, rnd.round, client_id):
            # The next task follows as soon as the cohort is in: poll fast.
            return Decision("wait", message=f"update for round {rnd.round} received", retry_after=0.3)
        if client_id in self.state.released(self.job_id, rnd.round):
            return Decision("wait", message=f"left round {rnd.round}; waiting for the next")
        return Decision("train", round=rnd.round, task_id=task_id)

    def _previous_cohort(self, current: int) -> frozenset[str]:
        """Round ``current - 1``'s cohort (closed, so fixed), read once per round rather than once
        per waiting heartbeat."""
        cached = self._cohort_cache
        if cached is not None and cached[0] == current:
            return cached[1]
        prev = self.state.find_round(self.job_id, current - 1) if current > 1 else None
        cohort = frozenset(prev.cohort) if prev is not None else frozenset()
        self._cohort_cache = (current, cohort)
        return cohort

    def _evaluation_due(self, job: Job, client_id: str) -> int | None:
        """The latest published round this client should evaluate on its held-out data, if any:
        every ``evaluation.every`` rounds and the last, for agents that run federated evaluation,
        once each (a finished job still asks for its last round before telling clients to stop)."""
        ev = self.spec.evaluation
        if not ev.clients or job.state == "cancelled" or job.state == "failed":
            return None
        last = job.current_round if job.state == "finished" else job.current_round - 1
        if last < 1:
            return None
        if last % ev.every and last != self.spec.rounds:
            return None
        if "federated-eval" not in self.state.client_features(client_id):
            return None
        if self.state.round(self.job_id, last).state != "published":  # evaluated and published beside the next round
            return None
        if self.state.has_client_eval(self.job_id, last, client_id):
            return None
        return last

    def _poll_secure(self, rnd: Round, client_id: str, task_id: str) -> Decision:
        sec = self.state.secagg_round(self.job_id, rnd.round)
        # Protocol steps come quickly one after another: poll fast while one is running.
        fast = 0.3
        if sec is None or sec.phase == "abandoned" or client_id not in sec.members:
            return Decision("wait", message="secure aggregation is being set up", retry_after=fast)
        idx = sec.members.index(client_id)
        if sec.phase == "advertise":
            if idx in {i for i, _, _ in self.state.secagg_messages(self.job_id, rnd.round, sec.attempt, "advertise")}:
                return Decision("wait", message="trained; waiting for the cohort", retry_after=fast)
            return Decision("train", round=rnd.round, task_id=task_id)
        answered = (self.state.has_update(self.job_id, rnd.round, client_id) if sec.phase == "mask" else
                    any(i == idx for i, _, _ in self.state.secagg_messages(self.job_id, rnd.round, sec.attempt,
                                                                           sec.phase)))
        step = self.state.secagg_outbox(self.job_id, rnd.round, sec.attempt, sec.phase, idx)
        if answered or step is None:
            return Decision("wait", message=f"secure aggregation: {sec.phase}", retry_after=fast)
        return Decision("secagg", round=rnd.round, task_id=task_id, step=step)

    # ------------------------------------------------------------------ the state machine
    def tick(self) -> bool:
        """One step. Returns False once the job is over."""
        with self._lock:
            job = self.state.job(self.job_id)
            if job.state in TERMINAL:
                return False
            rnd = self.state.find_round(self.job_id, job.current_round)
            if rnd is None:
                self._maybe_open(job)
            elif rnd.state == "open" and self.secure is not None:
                self._secure_step(job, rnd)
            elif rnd.state == "open" and self.asynchronous:
                if len(self.state.update_clients(self.job_id, rnd.round)) >= self.spec.buffer:
                    self.state.set_round_state(self.job_id, rnd.round, "closing")
                    self._aggregate_and_publish(job, self.state.round(self.job_id, rnd.round))
            elif rnd.state == "open":
                self._maybe_close(job, rnd)
            elif rnd.state == "closing":
                self._aggregate_and_publish(job, rnd)
            return True

    def _global_in(self, job: Job) -> str:
        if job.current_round == 1:
            return job.initial_adapter
        prev = self.state.round(self.job_id, job.current_round - 1)
        assert prev.global_out is not None
        return prev.global_out

    def _maybe_open(self, job: Job) -> None:
        live = self.presence.live(self.state.clients(self.job_id))
        now = time.time()
        if self.asynchronous and job.current_round > 1:
            # The next buffer opens at once; clients take their tasks from it as they ask.
            self.state.open_round(self.job_id, job.current_round, [], self._global_in(job),
                                  now + self.spec.round_deadline_seconds)
            return
        if len(live) < self.spec.min_clients:
            self._ready_since = None
            return
        if self._ready_since is None:
            self._ready_since = now
        waited = now - self._ready_since
        if len(live) < self.spec.clients_per_round and waited < self.spec.cohort_wait_seconds:
            return
        cohort = [] if self.asynchronous else sorted(random.sample(live, min(len(live), self.spec.clients_per_round)))
        deadline = now + self.spec.round_deadline_seconds
        self.state.open_round(self.job_id, job.current_round, cohort, self._global_in(job), deadline)
        if self.secure is not None:
            self.secure.start(job.current_round, cohort)
        self._ready_since = None
        log.info("job %s round %d opened with %d clients", self.job_id, job.current_round, len(cohort))

    def _secure_step(self, job: Job, rnd: Round) -> None:
        from fedtune.coordinator.secure_round import RoundAbandoned

        assert self.secure is not None and self.spec.secure_aggregation is not None
        sec = self.state.secagg_round(self.job_id, rnd.round)
        if sec is None or sec.phase == "abandoned":  # a crash between opening the round and fixing its parameters
            self.secure.start(rnd.round, list(rnd.cohort))
            return
        try:
            done = self.secure.tick(sec)
        except RoundAbandoned as e:
            self._abandon(sec, str(e))
            return
        if done:
            self.state.set_round_state(self.job_id, rnd.round, "closing")
            self._aggregate_and_publish(job, self.state.round(self.job_id, rnd.round))

    def _abandon(self, sec: SecAggRound, reason: str) -> None:
        assert self.spec.secure_aggregation is not None
        if sec.attempt >= self.spec.secure_aggregation.max_attempts:
            self.state.set_job_state(self.job_id, "failed", f"round {sec.round}: secure aggregation failed "
                                     f"{sec.attempt} times; last: {reason}")
            log.error("job %s failed: round %d could not be aggregated securely: %s", self.job_id, sec.round, reason)
            return
        self.state.abandon_round(self.job_id, sec.round)
        log.warning("job %s round %d attempt %d abandoned (%s); reopening with a new cohort", self.job_id,
                    sec.round, sec.attempt, reason)

    def _maybe_close(self, job: Job, rnd: Round) -> None:
        done = self.state.update_clients(self.job_id, rnd.round)
        now = time.time()
        # Members that left (Leave) are not waited for.
        released = self.state.released(self.job_id, rnd.round)
        waiting = set(rnd.cohort) - done - released
        enough = len(done) >= self.spec.min_clients
        if (not waiting and enough) or (now >= rnd.deadline and enough):
            self.state.set_round_state(self.job_id, rnd.round, "closing")
            self._aggregate_and_publish(job, self.state.round(self.job_id, rnd.round))
            return
        if released and len(rnd.cohort) - len(released) < self.spec.min_clients and now < rnd.deadline:
            # Too few members left to reach min_clients: invite live clients not yet asked now,
            # rather than at the deadline.
            live = self.presence.live(self.state.clients(self.job_id))
            fresh = [c for c in live if c not in rnd.cohort]
            if fresh:
                self.state.extend_round(self.job_id, rnd.round, fresh, rnd.deadline)
                log.info("job %s round %d: %d left; %d replacement clients invited", self.job_id, rnd.round,
                         len(released), len(fresh))
            return
        if now >= rnd.deadline:
            # Too few updates: keep what arrived (it is durable and trained on the same global
            # adapter), invite every live client not yet asked, and give the round another deadline.
            live = self.presence.live(self.state.clients(self.job_id))
            fresh = [c for c in live if c not in rnd.cohort]
            self.state.extend_round(self.job_id, rnd.round, fresh, now + self.spec.round_deadline_seconds)
            log.warning(
                "job %s round %d: %d of %d min updates at the deadline; extended with %d new clients",
                self.job_id, rnd.round, len(done), self.spec.min_clients, len(fresh),
            )

    def _dp(self, rnd: Round) -> DpNoise | None:
        """DP-FedAvg: Gaussian noise once on the sum of clipped updates, then the planned cohort size
        as a fixed denominator (so one client changes the mean by at most clip_norm / planned)."""
        p = self.spec.privacy
        return DpNoise(p.noise_multiplier, p.clip_norm, len(rnd.cohort)) if p is not None else None

    def _trained_on(self, u: Update) -> int:
        """The round whose global adapter an update started from (async: its task's, maybe older)."""
        task = self.state.task(u.task_id) if self.asynchronous else None
        return task[1] if task else u.round

    def _open(self, u: Update) -> bytes:
        # The envelope is bound to the round the client trained on (its task's).
        return self.keys.open_update(self.store.read(u.sha256),
                                     UpdateBinding(u.job_id, self._trained_on(u), u.client_id, u.update_id))

    def _after_aggregate(self, rnd: int) -> AfterAggregate | None:
        """The method's own step on round ``rnd``'s aggregate, if it has one (AdaLoRA's budget)."""
        if self.spec.tunes_blocks:
            return None
        budget = get_method(self.spec.peft.method).round_budget(self.spec.peft, self.schema, rnd, self.spec.rounds)
        return None if budget is None else AfterAggregate(self.spec.peft.model_dump(mode="json"), budget)

    def _strategy_run(self, rnd: int, updates: list[Update]) -> StrategyRun:
        """The job's strategy for round ``rnd``, with the state the previous round left."""
        agg = self.spec.aggregation
        sha = self.state.strategy_state(self.job_id, rnd - 1) if rnd > 1 else None
        staleness = tuple(rnd - self._trained_on(u) for u in updates) if self.asynchronous else ()
        return StrategyRun(agg.strategy, dict(agg.options), self.store.read(sha) if sha else None, rnd,
                           len(self.state.clients(self.job_id)), staleness, agg.async_.staleness_exponent)

    def _aggregate_and_publish(self, job: Job, rnd: Round) -> None:
        t0 = time.perf_counter()
        updates = self.state.updates(self.job_id, rnd.round)
        global_in = self.store.read(rnd.global_in)
        privacy = self.spec.privacy
        dp = self._dp(rnd)
        if self.secure is not None:
            from fedtune.coordinator.secure_round import RoundAbandoned

            sec = self.state.secagg_round(self.job_id, rnd.round)
            assert sec is not None
            try:
                total, clip, _ = self.secure.aggregate(sec)
            except RoundAbandoned as e:
                self.state.set_round_state(self.job_id, rnd.round, "open")
                self._abandon(sec, str(e))
                return
            new_global, strategy_state = self.compute.aggregate_sum(global_in, total, self.wire_schema, clip, dp,
                                                                    self._after_aggregate(rnd.round),
                                                                    self._strategy_run(rnd.round, updates))
        else:
            plains = [self._open(u) for u in updates]
            lora = None
            if self.lora_rank is not None:
                # Each update's rank was checked against the job's at upload.
                ranks = tuple(declared_rank(u.metrics, self.lora_rank) for u in updates)
                lora = LoraAggregation(self.spec.aggregation.lora, self.lora_rank, ranks)
            new_global, strategy_state = self.compute.aggregate(
                global_in, plains, [u.num_examples for u in updates], self.spec.codec, self.schema,
                self._strategy_run(rnd.round, updates), dp, lora, self._after_aggregate(rnd.round))
        global_out = self.store.put_bytes(new_global)
        state_sha = self.store.put_bytes(strategy_state) if strategy_state is not None else None
        product_error = blob_metadata(new_global).get(PRODUCT_ERROR_METADATA)
        examples = sum(u.num_examples for u in updates)
        losses = [(u.metrics.get("train_loss", math.nan), u.num_examples) for u in updates]
        metrics: dict[str, float] = {
            "contributors": float(len(updates)),
            "cohort": float(len(rnd.cohort)),
            "examples": float(examples),
            "bytes_up": float(sum(u.size for u in updates)),
            "bytes_down": float(self.state.bytes_down(self.job_id, rnd.round)),
            "seconds": time.time() - rnd.opened,
        }
        if product_error is not None:
            metrics["lora_product_error"] = float(product_error)
        if self.asynchronous and updates:
            ages = [rnd.round - self._trained_on(u) for u in updates]
            metrics["staleness_mean"] = sum(ages) / len(ages)
            metrics["staleness_max"] = float(max(ages))
        method_metrics = blob_metadata(new_global).get(METHOD_METRICS_METADATA)
        if method_metrics:
            metrics |= {k: float(v) for k, v in json.loads(method_metrics).items()}
        if self.lora_rank is not None:
            declared = [u.metrics.get("lora_rank", float(self.lora_rank)) for u in updates]
            if declared:
                metrics["client_lora_rank_min"] = min(declared)
        for key in ("train_seconds", "fetch_seconds"):
            values = [u.metrics[key] for u in updates if key in u.metrics]
            if values:
                metrics[f"client_{key}_max"] = max(values)
        if all(math.isfinite(loss) for loss, _ in losses):
            metrics["train_loss"] = sum(loss * n for loss, n in losses) / max(examples, 1)
        privacy_json = None
        if privacy is not None:
            enrolled = max(len(self.state.clients(self.job_id)), 1)
            rate = privacy.sample_rate or min(1.0, len(rnd.cohort) / enrolled)
            accountant = RdpAccountant.from_dict(self.accountant.to_dict())
            accountant.step(noise_multiplier=privacy.noise_multiplier, sample_rate=rate)
            metrics["epsilon"] = accountant.epsilon(privacy.delta)
            metrics["dp_delta"] = privacy.delta
            privacy_json = json.dumps(accountant.to_dict())
        metrics["aggregate_seconds"] = time.perf_counter() - t0
        # Opened -> aggregated: the round's own length (evaluation and publication run beside the next).
        metrics["aggregated_seconds"] = time.time() - rnd.opened
        if rnd.round >= self.spec.rounds:
            # The job ends with its last round published: everything before it first, then it.
            if not self._published_all():
                return  # stopping: the round stays closing and is aggregated again at the next start
            self._evaluate_and_publish(job, rnd, global_out, metrics, privacy_json, state_sha, last=True)
            self.compute.release(self.job_id)
            return
        self.state.aggregate_round(self.job_id, rnd.round, global_out, metrics, privacy_json=privacy_json,
                                   strategy_state=state_sha)
        if privacy_json is not None:
            self.accountant = RdpAccountant.from_dict(json.loads(privacy_json))
        log.info("job %s round %d aggregated (%d contributors); round %d opens", self.job_id, rnd.round,
                 len(updates), rnd.round + 1)
        self._publish.put(rnd.round)

    # ------------------------------------------------------------------ evaluation and publication
    def _published_all(self) -> bool:
        """Waits until every aggregated round is published; False when the engine stops first."""
        while self._publish.unfinished_tasks:
            if self._stop.wait(0.02):
                return False
        return True

    def _run_publisher(self) -> None:
        while True:
            item = self._publish.get()
            try:
                if item is None or self._stop.is_set():
                    return
                if item == 0:
                    job = self.state.job(self.job_id)
                    if job.base_eval_json is None:
                        self.state.set_base_eval(self.job_id, self.compute.evaluate(job, None))
                    continue
                rnd = self.state.round(self.job_id, item)
                if rnd.state != "aggregated":  # published already (a repeat after a restart)
                    continue
                assert rnd.global_out is not None
                self._evaluate_and_publish(self.state.job(self.job_id), rnd, rnd.global_out, dict(rnd.metrics),
                                           None, None, last=False)
                self._changed()
            except Exception as e:  # evaluation or publication broke: the job fails visibly
                log.exception("job %s failed", self.job_id)
                self._fail(e)
                self._stop.set()
                self._wake.set()
                return
            finally:
                self._publish.task_done()

    def _evaluate_and_publish(self, job: Job, rnd: Round, global_out: str, metrics: dict[str, float],
                              privacy_json: str | None, state_sha: str | None, *, last: bool) -> None:
        """Evaluates round ``rnd``'s aggregate, writes its signed adapter directory and records it
        (with the last round: the aggregate, the strategy state and the job's end, in one transaction)."""
        new_global = self.store.read(global_out)
        privacy = self.spec.privacy
        t1 = time.perf_counter()
        metrics.update(self.compute.evaluate(job, new_global))
        t2 = time.perf_counter()
        metrics["eval_seconds"] = t2 - t1
        plan = plan_for(job.emulator_dir)
        published = plan.to_full_blob(new_global) if plan else new_global
        extra: dict[str, object] = ({"offsite": {**plan.summary(), "tune": "blocks" if self.spec.tunes_blocks else "lora"}}
                                    if plan else {})
        agg = self.spec.aggregation
        extra["aggregation"] = {"strategy": agg.strategy, "options": dict(agg.options), "mode": agg.mode}
        extra["lineage"] = publication_lineage(self.state, job, rnd)  # spec hash, parent round
        if privacy is not None:
            extra["privacy"] = {**privacy.model_dump(mode="json"), "epsilon": metrics["epsilon"],
                                "accountant": "rdp-subsampled-gaussian"}
        if self.adapter_config is None:
            self.adapter_config = job_adapter_config(job, self.spec)
        contributors = int(metrics.get("contributors", 0))
        path, _ = publish_adapter(
            self.adapters_root,
            job_id=self.job_id,
            job_name=job.name,
            rnd=rnd.round,
            state=published,
            peft=self.spec.peft,
            base_model=job.base_model,
            base_hash=job.base_hash,
            metrics=metrics,
            contributors=contributors,
            signer=self.keys.signing_key,
            extra=extra,
            adapter_config=self.adapter_config,
        )
        metrics["publish_seconds"] = time.perf_counter() - t2
        # Opened -> published, aggregation, evaluation and publication included.
        metrics["seconds"] = time.time() - rnd.opened
        manifest = (path / MANIFEST).read_text()
        if last:
            self.state.close_round(self.job_id, rnd.round, global_out, metrics, str(path), manifest, last=True,
                                   privacy_json=privacy_json, strategy_state=state_sha)
        else:
            self.state.publish_round(self.job_id, rnd.round, metrics, str(path), manifest)
        if privacy_json is not None:
            self.accountant = RdpAccountant.from_dict(json.loads(privacy_json))
        log.info("job %s round %d published at %s (%d contributors)", self.job_id, rnd.round, path, contributors)
