"""The coordinator's domain layer: jobs, enrollment, tasks and updates over state and store.

The gRPC servicers are thin wrappers over this class; everything here raises domain errors from
:mod:`fedtune.errors`, which the servicers map to status codes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from fedtune.compression.codecs import get_codec
from fedtune.compression.emulator_storage import load_emulator
from fedtune.coordinator.compute import InProcessCompute, split_controls
from fedtune.coordinator.engine import TERMINAL, Decision, RoundEngine
from fedtune.coordinator.evaluator import Evaluator
from fedtune.coordinator.keyring import KeyRing
from fedtune.coordinator.long_poll import HeldCalls, JobSignal, Offload
from fedtune.coordinator.offsite import prepare_emulator
from fedtune.coordinator.presence import DEFAULT_HEARTBEAT_SECONDS, Presence
from fedtune.coordinator.secure_round import join_shares
from fedtune.coordinator.state import Client, CoordinatorState, FileEntry, Job, SecAggRound, Update
from fedtune.coordinator.store import ArtifactStore
from fedtune.coordinator.traffic import TrafficCounts
from fedtune.coordinator.validation import aggregate_client_evals, check_control, validate_update
from fedtune.crypto.envelope import SCHEME as ENVELOPE_SCHEME
from fedtune.crypto.envelope import UpdateBinding
from fedtune.crypto.keys import ed25519_public
from fedtune.data import load_data
from fedtune.errors import InvalidInput, LimitExceeded, NotFound, PreconditionFailed, Unavailable
from fedtune.hashing import loadable_files, model_dir_hash
from fedtune.methods import config_for, get_method
from fedtune.methods.lora import declared_rank, schema_at_rank, travelling
from fedtune.models import base_model_type, is_preset, pick_device, resolve_base, skeleton_causal_lm
from fedtune.peft_io import (
    adapter_state,
    build_peft_model,
    bytes_to_tensors,
    check_sequence_room,
    tensors_to_bytes,
)
from fedtune.secagg import EncryptedShare, MaskedInput, SecAggParams, UnmaskShares
from fedtune.secagg.adverts import WIRE_CODEC as SECAGG_CODEC
from fedtune.secagg.adverts import verify_advert
from fedtune.spec import JobSpec, parse_spec

if TYPE_CHECKING:
    from fedtune.cluster.jobs import RayBackend

log = logging.getLogger(__name__)

R = TypeVar("R")

# Headroom over the fp32 adapter for safetensors' header and metadata and the envelope.
UPDATE_SLACK_BYTES = 64 * 1024
# The longest a heartbeat is held (long-poll) whatever the client asks; keepalive pings keep the
# connection up meanwhile.
MAX_LONG_POLL_SECONDS = 30.0
# Held heartbeats refresh their clients' presence this often (a client gone ends its held call at
# once: gRPC cancels it).
LONG_POLL_REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class TaskInfo:
    """Everything a client needs to run one round's task."""

    job: Job
    round: int
    task_id: str
    files: list[FileEntry]
    global_adapter: FileEntry
    deadline: float
    max_update_bytes: int
    job_public_key: bytes
    secagg: SecAggRound | None = None
    client_id: str = ""
    # SCAFFOLD: the strategy state the previous round left (the server's control variate).
    strategy_state: FileEntry | None = None


@dataclass(frozen=True)
class IncomingUpdate:
    """An upload as received, before validation."""

    job_id: str
    round: int
    task_id: str
    update_id: str
    num_examples: int
    metrics: dict[str, float]
    codec: str
    envelope: str
    payload: bytes


class Coordinator:
    """Owns the state dir: SQLite state, blob store, published adapters and one engine per job.

    Engines run as threads in this process, or, after :meth:`use_ray`, as Ray actors scheduled by
    priority and quota (:mod:`fedtune.cluster.jobs`) on a local Ray or an existing cluster.
    """

    def __init__(self, state_dir: Path, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS, *,
                 state: CoordinatorState | None = None) -> None:
        self.state_dir = state_dir
        self.state = state if state is not None else CoordinatorState(state_dir / "state.db")
        self.store = ArtifactStore(state_dir / "blobs")
        self.adapters_root = state_dir / "adapters"
        self.models_root = state_dir / "models"
        self.presence = Presence(heartbeat_seconds)
        self.keys = KeyRing(state_dir / "keys")
        # On a coordinator with a GPU, evaluation runs there (in bf16 where the GPU has it).
        self.evaluator = Evaluator(self.base_dir, pick_device("auto"))
        self.compute = InProcessCompute(self.evaluator)
        self.engines: dict[str, RoundEngine] = {}
        self._schemas: dict[str, dict[str, tuple[int, ...]]] = {}
        self._specs: dict[str, JobSpec] = {}
        self.ray: RayBackend | None = None
        self.signals: dict[str, JobSignal] = {}
        # Held heartbeats: coroutines on the server's event loop, no thread each (long_poll.py).
        self.held = HeldCalls()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        # Uploads and downloads as the client API sees them (the metrics endpoint reads them).
        self.traffic = TrafficCounts()

    def use_ray(self, address: str | None) -> None:
        """Runs jobs as Ray actors under the scheduler: on the cluster at ``address``, else a local Ray.

        Call before :meth:`resume`. Raises what :func:`fedtune.cluster.connect.connect` raises.
        """
        from fedtune.cluster.jobs import RayBackend

        # Engines in Ray actors read heartbeats from a file; in-process ones from memory.
        self.presence = Presence(self.presence.heartbeat_seconds, shared=self.state_dir / "presence.db")
        self.ray = RayBackend(self, address)

    @property
    def backend_name(self) -> str:
        """``ray`` or ``in-process``."""
        return "ray" if self.ray is not None else "in-process"

    # ------------------------------------------------------------------ lifecycle
    def resume(self) -> None:
        """Starts an engine for every job that is still running or queued (after a restart too)."""
        for job in self.state.jobs():
            if job.state not in TERMINAL:
                try:
                    self._start_engine(job.job_id)
                except NotFound as e:
                    # A blob the job needs is gone from the state dir (deleted or never copied):
                    # the job cannot go on, the coordinator and its other jobs can.
                    message = f"cannot resume: {e} (missing from {self.store.root})"
                    log.error("job %s %s; marked failed", job.job_id, message)
                    self.engines.pop(job.job_id, None)
                    self.state.set_job_state(job.job_id, "failed", message)

    def _start_engine(self, job_id: str) -> None:
        engine = RoundEngine(job_id, self.state, self.store, self.presence, self.compute, self.adapters_root,
                             self.keys)
        self.engines[job_id] = engine
        signal = self.signals.setdefault(job_id, JobSignal())
        if self.ray is not None:
            # The actor drives the job; this copy only answers heartbeats from the shared state, and
            # a watcher bumps the job's signal when that state moves.
            self.ray.submit(job_id)
            self._watch()
        else:
            engine.on_change(signal.bump)
            engine.start()

    def _watch(self) -> None:
        if self._watcher is not None:
            return

        def run() -> None:
            seen: dict[str, tuple[object, ...]] = {}
            while not self._stopping.wait(0.05):
                for job_id, engine in list(self.engines.items()):
                    try:
                        fp = engine.fingerprint()
                    except Exception:  # a job being created or removed: look again next time
                        log.debug("job %s: no fingerprint yet", job_id, exc_info=True)
                        continue
                    if seen.get(job_id) != fp:
                        seen[job_id] = fp
                        self.signals[job_id].bump()

        self._watcher = threading.Thread(target=run, name="ray-job-watcher", daemon=True)
        self._watcher.start()

    def wake(self, job_id: str) -> None:
        """Tells a job's engine that something that can move its round happened."""
        engine = self.engines.get(job_id)
        if engine is None:
            return
        if self.ray is not None:
            self.ray.wake(job_id)
        else:
            engine.wake()

    def release_waiters(self) -> None:
        """Answers every held heartbeat now (the service is stopping)."""
        self._stopping.set()
        for signal in list(self.signals.values()):
            signal.close()

    def queue_place(self, job_id: str) -> tuple[int, str]:
        """(place in line, reason) for a queued job; (0, '') otherwise."""
        return self.ray.queue_place(job_id) if self.ray is not None else (0, "")

    def stop(self) -> None:
        """Stops every engine (and Ray, when this process started it) and closes the database."""
        self.release_waiters()
        for engine in self.engines.values():
            engine.stop()
        if self.ray is not None:
            self.ray.stop()
        self.state.close()

    def base_dir(self, job: Job) -> Path:
        """Local directory of a job's base model (at its pinned revision)."""
        return resolve_base(job.base_model, self.models_root, revision=JobSpec.stored(job.spec_json).base_revision)

    # ------------------------------------------------------------------ jobs
    def create_job(self, spec_yaml: str) -> Job:
        """Validates a spec, prepares its base model and initial adapter, and starts the job.

        Nothing is written unless every check passes.
        """
        spec = parse_spec(spec_yaml)
        if spec.eval_data:
            from fedtune.metrics import check_metric_data

            # The metrics the job asks for must find records of their kind there.
            check_metric_data(spec.evaluation.metrics, load_data(Path(spec.eval_data), spec.data), spec.eval_data)
        if spec.base_revision and (is_preset(spec.base_model) or Path(spec.base_model).expanduser().is_dir()):
            raise InvalidInput(f"job spec: base_revision: {spec.base_model!r} is a preset or a local directory; "
                               "a revision pins a hub id's snapshot")
        base_dir = resolve_base(spec.base_model, self.models_root, revision=spec.base_revision)
        # What consumers pass to from_pretrained: the directory for presets and local models,
        # the hub id otherwise.
        base_model = str(base_dir) if is_preset(spec.base_model) or Path(spec.base_model).is_dir() else spec.base_model
        method = get_method(spec.peft.method)
        if not spec.tunes_blocks:
            # Module options the spec leaves None become the base family's, stored explicit: every
            # client, the evaluation and the published adapter_config then name the same modules.
            spec = spec.model_copy(update={"peft": method.with_defaults(spec.peft, base_model_type(base_dir))})
        plan = prepare_emulator(spec, base_dir, self.state_dir / "emulators") if spec.mode == "offsite" else None
        # Offsite: clients get the emulator, and tune its adapter blocks only (LoRA on them, or
        # the blocks themselves: then the initial adapter is a copy of the blocks' weights).
        client_dir = plan.emulator_dir if plan is not None else base_dir
        # A LoRA adapter's init depends on the architecture and the seed only: a skeleton of the base
        # (weights never loaded) is enough, so creating a job does not hold the base in memory.
        model = load_emulator(client_dir, torch.device("cpu")) if plan else skeleton_causal_lm(base_dir)
        peft_cfg: dict[str, object] = spec.peft.model_dump(mode="json")
        if method.lora:
            peft_cfg["lora_aggregation"] = spec.aggregation.lora
        if plan is not None:
            peft_cfg |= {"layers_to_transform": plan.emulator_layers, "layers_pattern": plan.layers_pattern,
                         "tune": "blocks" if spec.tunes_blocks else "lora"}
        check_sequence_room(model, method.virtual_tokens(spec.peft), spec.training.max_seq_len)
        try:
            peft_model = build_peft_model(
                model, config=None if spec.tunes_blocks else config_for(peft_cfg), seed=spec.training.seed,
                layers=plan.emulator_layers if plan else None, layers_pattern=plan.layers_pattern if plan else None,
                whole_blocks=spec.tunes_blocks,
            )
        except (ValueError, InvalidInput) as e:
            targets = getattr(spec.peft, "target_modules", None)
            what = ("offsite.tune blocks" if spec.tunes_blocks else f"peft.target_modules {targets}" if targets
                    else f"peft.method {method.name}")
            raise InvalidInput(f"job spec: {what}: {str(e).splitlines()[0]}") from e
        initial = self.store.put_bytes(tensors_to_bytes(adapter_state(peft_model)))
        del peft_model, model
        # Only what loading needs travels: no .bin duplicates of safetensors, no original/ folder.
        files = [FileEntry(p.name, self.store.put_file(p), p.stat().st_size) for p in loadable_files(client_dir)]
        job = self.state.add_job(
            name=spec.name,
            spec_json=spec.model_dump_json(),
            base_model=base_model,
            base_hash=model_dir_hash(base_dir),
            files=files,
            initial_adapter=initial,
            peft_config_json=json.dumps(peft_cfg),
            emulator_dir=str(plan.emulator_dir) if plan else None,
            state="queued" if self.ray is not None else "running",
        )
        self.keys.job_key(job.job_id)
        log.info("job %s created: %s on %s", job.job_id, spec.name, base_model)
        self._start_engine(job.job_id)
        return job

    def spec(self, job_id: str) -> JobSpec:
        """A job's validated spec (parsed once: a job's spec never changes)."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = JobSpec.stored(self.state.job(job_id).spec_json)
        return spec

    def cancel_job(self, job_id: str) -> Job:
        """Cancels a job; its published adapters stay."""
        job = self.state.job(job_id)
        if job.state in TERMINAL:
            raise PreconditionFailed(f"job {job_id} is already {job.state}")
        engine = self.engines.get(job_id)
        if engine is not None:
            engine.stop()
        self.state.set_job_state(job_id, "cancelled", "cancelled by the operator")
        if self.ray is not None:
            self.ray.cancel(job_id)
        return self.state.job(job_id)

    # ------------------------------------------------------------------ clients
    def required_features(self, spec: JobSpec) -> list[tuple[str, str]]:
        """(feature, why) for what a job needs its clients' agents to run."""
        need = []
        strategy = spec.aggregation.build()
        if strategy.client_feature:
            why = f"aggregation strategy {strategy.name}, which runs in the client's training loop"
            need.append((strategy.client_feature, why))
        if spec.aggregation.mode == "async":
            need.append(("async", "asynchronous rounds (aggregation.mode async)"))
        return need

    def join(self, token: str, name: str, device: str, sign_public_key: bytes, kx_public_key: bytes,
             features: tuple[str, ...] = (), agent_version: str = "") -> Client:
        """Enrolls a client with a token and its public keys.

        Raises:
            PreconditionFailed: the job needs a feature the client's agent does not run (an older
                agent would silently train plain FedAvg); the token is not spent.
        """
        if not token:
            raise InvalidInput("join request has no enrollment token")
        ed25519_public(sign_public_key)
        if len(kx_public_key) != 32:
            raise InvalidInput("join request needs a 32-byte X25519 public key")

        def admit(job_id: str) -> None:
            for feature, why in self.required_features(self.spec(job_id)):
                if feature not in features:
                    raise PreconditionFailed(
                        f"job {job_id} uses {why}; this client's agent (fedtune {agent_version or 'unknown'}) "
                        f"does not run {feature!r}: upgrade fedtune on this client")

        client = self.state.join(token, name or "client", device or "unknown", sign_public_key, kx_public_key,
                                 tuple(features), admit)
        self.presence.touch(client.client_id)
        log.info("client %s (%s) joined job %s", client.client_id, client.name, client.job_id)
        self.wake(client.job_id)
        return client

    async def heartbeat(self, client_of: Callable[[], Client], wait_seconds: float, training_task_id: str,
                        offload: Offload, answer: Callable[[Decision, TaskInfo | None], R]) -> R:
        """Records liveness and tells the client what to do (on the server's event loop): returns
        ``answer(decision, info)``.

        ``client_of``: reads the calling client. It, the polls and ``answer`` for anything but a
        WAIT (a task's message reads the spec) block: they run in the pool, through
        ``offload(fn, *args)``, one trip per poll.

        ``wait_seconds`` > 0: a long-poll; with nothing to do the call is held (up to
        MAX_LONG_POLL_SECONDS) and answered as soon as a task or step is ready, or with a WAIT whose
        ``retry_after`` is 0 (ask again at once). One held call per client: a newer one ends the
        older. A held call costs no thread; while held, its client's presence is refreshed every
        LONG_POLL_REFRESH_SECONDS; it ends when the client goes away (gRPC cancels it) and when
        the service stops (:meth:`release_waiters`). ``training_task_id``: the client is training
        that task; presence only. A plain poll's WAIT carries the paced idle interval.
        """
        client, generation, decision, done = await offload(self._heartbeat_now, client_of, training_task_id, answer)
        if done is not None:
            return done
        signal = self.signals.get(client.job_id)
        if wait_seconds <= 0 or signal is None or training_task_id \
                or not self.held.has_room(client.client_id):  # every place taken: a plain poll
            return answer(decision, None)

        def poll() -> R | None:
            decision, info = self._poll(client)
            return answer(decision, info) if decision.action != "wait" else None

        async def repoll() -> R | None:
            return await offload(poll)  # type: ignore[no-any-return]

        async def touch(ids: list[str]) -> None:
            await offload(self.presence.touch_many, ids)

        held = await self.held.hold(client.client_id, signal, generation, min(wait_seconds, MAX_LONG_POLL_SECONDS),
                                    self._stopping, repoll, touch, LONG_POLL_REFRESH_SECONDS)
        return held if held is not None else answer(dataclasses.replace(decision, retry_after=0.0), None)

    def _heartbeat_now(self, client_of: Callable[[], Client], training_task_id: str,
                       answer: Callable[[Decision, TaskInfo | None], R]) -> tuple[Client, int, Decision, R | None]:
        """A heartbeat's blocking part: the client, the job signal's generation before the poll, what
        the client should do now, and its answer unless that is a WAIT."""
        client = client_of()
        if self.presence.touch(client.client_id):  # a client back (or new): a cohort may now fill
            self.wake(client.job_id)
        signal = self.signals.get(client.job_id)
        generation = signal.generation if signal is not None else 0
        if training_task_id:
            return client, generation, Decision("wait", message=f"training {training_task_id}",
                                                retry_after=float(self.presence.heartbeat_seconds)), None
        decision, info = self._poll(client)
        if decision.action != "wait":
            return client, generation, decision, answer(decision, info)
        if decision.retry_after is None:
            decision = dataclasses.replace(decision, retry_after=self.presence.idle_retry(len(self.held)))
        return client, generation, decision, None

    def _poll(self, client: Client) -> tuple[Decision, TaskInfo | None]:
        engine = self.engines.get(client.job_id)
        job = self.state.job(client.job_id)
        if engine is None:
            return Decision("stop", message=f"job {job.job_id} is {job.state}"), None
        if job.state == "queued":
            place, reason = self.queue_place(client.job_id)
            return Decision("wait", message=f"job queued (place {place}): {reason}", retry_after=2.0), None
        decision = engine.poll(client.client_id)
        if decision.action not in ("train", "evaluate"):
            return decision, None
        rnd = self.state.round(job.job_id, decision.round)
        # Training starts from the round's global adapter; evaluation reads the one it published.
        blob = rnd.global_out if decision.action == "evaluate" else decision.global_in or rnd.global_in
        assert blob is not None
        adapter = FileEntry("adapter_model.safetensors", blob, self.store.size(blob))
        state_sha = self.state.strategy_state(job.job_id, rnd.round - 1) if decision.action == "train" else None
        strategy_state = FileEntry("strategy_state.safetensors", state_sha, self.store.size(state_sha)) \
            if state_sha else None
        info = TaskInfo(job, rnd.round, decision.task_id, self.state.job_files(job.job_id), adapter,
                        rnd.deadline, self.max_update_bytes(job), self.keys.job_public_key(job.job_id),
                        self.state.secagg_round(job.job_id, rnd.round), client.client_id, strategy_state)
        return decision, info

    def leave(self, client: Client, task_id: str, reason: str) -> tuple[bool, str]:
        """A client going away: its open task in the current round is released, so the round does
        not wait for it. Returns (released, what happened). An accepted update stays counted.

        Raises:
            PreconditionFailed: ``task_id`` is not this client's task in the job's current round.
        """
        job = self.state.job(client.job_id)
        self.presence.forget(client.client_id)
        rnd = self.state.find_round(job.job_id, job.current_round)
        own = self.state.task_for(job.job_id, job.current_round, client.client_id) if rnd else None
        if task_id and task_id != own:
            found = self.state.task(task_id)
            if found is None or found[2] != client.client_id:
                raise PreconditionFailed(f"task {task_id!r} is not this client's task")
            return False, f"task {task_id} is not open (round {found[1]} of job {found[0]} is over)"
        log.info("client %s left job %s (%s)", client.client_id, job.job_id, reason or "no reason given")
        if job.state in TERMINAL or rnd is None or rnd.state != "open" or own is None:
            return False, "no open task"
        if self.state.has_update(job.job_id, rnd.round, client.client_id):
            return False, f"the update for round {rnd.round} was accepted and stays counted"
        if self.spec(job.job_id).secure_aggregation is not None:
            # SecAgg's own dropout handling applies: the round goes on when its phase times out or
            # the rest have answered.
            self.wake(job.job_id)
            return False, f"round {rnd.round} is a secure-aggregation round: counted as a dropout"
        released = self.state.release_task(job.job_id, rnd.round, client.client_id, reason or "left")
        self.wake(job.job_id)
        return released, (f"task {own} of round {rnd.round} released" if released
                          else f"task {own} was released already")

    def max_update_bytes(self, job: Job) -> int:
        """Largest payload accepted for one update of this job (SCAFFOLD's control variate doubles it)."""
        copies = 2 if self.spec(job.job_id).aggregation.build().client_feature == "scaffold" else 1
        return copies * self.store.size(job.initial_adapter) + UPDATE_SLACK_BYTES

    def check_download(self, client: Client, sha256: str, offset: int) -> int:
        """Authorizes a download and returns the blob's size."""
        if not self.state.job_may_serve(client.job_id, sha256) or not self.store.has(sha256):
            raise NotFound(f"no artifact {sha256} for job {client.job_id}")
        size = self.store.size(sha256)
        if offset > size:
            raise InvalidInput(f"download offset {offset} is past the end of artifact {sha256} ({size} bytes)")
        return size

    def count_download(self, client: Client, nbytes: int) -> None:
        """Adds served bytes to the client's task in the current round, if any."""
        job = self.state.job(client.job_id)
        self.state.add_bytes_down(job.job_id, client.client_id, job.current_round, nbytes)

    def check_upload_header(self, client: Client, job_id: str, rnd: int, task_id: str, update_id: str,
                            total_size: int) -> bool:
        """Checks an upload's header before any data is read. Returns True when it is a known
        update id (a retry), which the caller acknowledges without reading the data."""
        if not update_id or len(update_id) > 128:
            raise InvalidInput("update id must be 1 to 128 characters")
        if job_id != client.job_id:
            raise PreconditionFailed(f"client {client.client_id} is not enrolled in job {job_id!r}")
        known = self.state.find_update(update_id)
        if known is not None:
            if known.client_id != client.client_id:
                raise PreconditionFailed(f"update id {update_id} belongs to another client")
            return True
        job = self.state.job(job_id)
        if self.spec(job_id).aggregation.mode == "async":
            self.async_target(client, job, rnd, task_id)
        else:
            round_row = self.state.find_round(job_id, rnd)
            if round_row is None or round_row.state != "open" or rnd != job.current_round:
                raise PreconditionFailed(f"round {rnd} of job {job_id} is not open")
            if client.client_id not in round_row.cohort:
                raise PreconditionFailed(f"client {client.client_id} is not in the cohort of round {rnd}")
            expected_task = self.state.task_for(job_id, rnd, client.client_id)
            if task_id != expected_task:
                raise PreconditionFailed(f"task {task_id!r} is not this client's task for round {rnd}")
        limit = self.max_update_bytes(job)
        if total_size > limit:
            raise LimitExceeded(f"update of {total_size} bytes is over the job's limit of {limit} bytes")
        return False

    def async_target(self, client: Client, job: Job, rnd: int, task_id: str) -> int:
        """Async mode: the buffer (open round) an update of ``task_id``, trained on round ``rnd``'s
        global adapter, lands in.

        Raises:
            PreconditionFailed: not this client's task, the job is over, or the update is older
                than ``async.max_staleness`` versions.
            Unavailable: the buffer is being aggregated (retry in a moment: the next one opens).
        """
        if self.state.task(task_id) != (job.job_id, rnd, client.client_id):
            raise PreconditionFailed(f"task {task_id!r} is not this client's task for round {rnd}")
        if job.state in TERMINAL:
            raise PreconditionFailed(f"job {job.job_id} is {job.state}")
        current = self.state.find_round(job.job_id, job.current_round)
        if current is None or current.state != "open":
            raise Unavailable(f"job {job.job_id}: version {job.current_round - 1} is being aggregated; "
                              "retry in a moment")
        limit = self.spec(job.job_id).aggregation.async_.max_staleness
        if limit is not None and current.round - rnd > limit:
            raise PreconditionFailed(f"update trained on round {rnd}'s adapter is {current.round - rnd} versions "
                                     f"old; job {job.job_id} accepts at most {limit}")
        return current.round

    def _schema(self, job: Job) -> dict[str, tuple[int, ...]]:
        if job.job_id not in self._schemas:
            tensors = bytes_to_tensors(self.store.read(job.initial_adapter))
            self._schemas[job.job_id] = {k: tuple(v.shape) for k, v in tensors.items()}
        return self._schemas[job.job_id]

    def _update_schema(self, job: Job, spec: JobSpec, metrics: dict[str, float]) -> dict[str, tuple[int, ...]]:
        """The shapes an update must have: the job's adapter, or for LoRA the tensors its mode sends at
        the rank the client declares (``lora_rank``, at most the job's)."""
        schema = self._schema(job)
        if not get_method(spec.peft.method).lora or spec.tunes_blocks:
            return schema
        job_rank = spec.peft.r
        try:
            rank = declared_rank(metrics, job_rank)
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        if rank != job_rank and spec.peft.rank_pattern:
            raise InvalidInput("update declares a LoRA rank below the job's, which has a rank_pattern")
        return travelling(schema_at_rank(schema, rank), spec.aggregation.lora)

    def accept_update(self, client: Client, inc: IncomingUpdate) -> bool:
        """Validates, stores durably and records an update. Returns False for a retry of an
        update already stored (nothing changes)."""
        job = self.state.job(inc.job_id)
        spec = self.spec(job.job_id)
        if inc.envelope != ENVELOPE_SCHEME:
            raise InvalidInput(f"update envelope {inc.envelope!r} is not {ENVELOPE_SCHEME!r}")
        wanted_codec = SECAGG_CODEC if spec.secure_aggregation is not None else spec.codec
        if inc.codec != wanted_codec:
            raise InvalidInput(f"update codec {inc.codec!r} is not the job's codec {wanted_codec!r}")
        if inc.num_examples <= 0:
            raise InvalidInput("update must report a positive example count")
        for key, value in inc.metrics.items():
            if not isinstance(value, float) or not math.isfinite(value):
                raise InvalidInput(f"metric {key!r} is not a finite number")
        binding = UpdateBinding(inc.job_id, inc.round, client.client_id, inc.update_id)
        plain = self.keys.open_update(inc.payload, binding)
        if spec.secure_aggregation is not None:
            self._check_masked_input(client, inc, plain)
        else:
            wire, control = split_controls(bytes_to_tensors(plain))
            schema = self._update_schema(job, spec, inc.metrics)
            validate_update(wire, schema, get_codec(spec.codec), spec.aggregation.max_update_norm)
            scaffold = spec.aggregation.strategy == "scaffold"
            if scaffold or control is not None:
                check_control(control, schema, scaffold, self._schema(job))
        # The envelope is what is stored: updates stay encrypted at rest until aggregation.
        sha = self.store.put_bytes(inc.payload)
        # Async: it joins the open buffer; its task keeps the round it trained on (its staleness).
        target = self.async_target(client, job, inc.round, inc.task_id) if spec.aggregation.mode == "async" \
            else inc.round
        fresh = self.state.add_update(Update(
            update_id=inc.update_id, job_id=inc.job_id, round=target, client_id=client.client_id,
            task_id=inc.task_id, sha256=sha, size=len(inc.payload), num_examples=inc.num_examples,
            metrics=dict(inc.metrics), codec=inc.codec, received=time.time(),
        ))
        if fresh:
            log.info("job %s round %d: update %s from %s accepted (%d bytes, %d examples)",
                     inc.job_id, inc.round, inc.update_id, client.client_id, len(inc.payload), inc.num_examples)
            self.wake(inc.job_id)
        return fresh

    def report_eval(self, client: Client, job_id: str, rnd: int, num_examples: int,
                    metrics: dict[str, float]) -> bool:
        """Stores a client's evaluation of a published round. Returns False for a repeat."""
        if job_id != client.job_id:
            raise PreconditionFailed(f"client {client.client_id} is not enrolled in job {job_id!r}")
        spec = self.spec(job_id)
        if not spec.evaluation.clients:
            raise PreconditionFailed(f"job {job_id} does not ask clients to evaluate (evaluation.clients is off)")
        rnd_row = self.state.find_round(job_id, rnd)
        if rnd_row is None or rnd_row.state != "published":
            raise PreconditionFailed(f"round {rnd} of job {job_id} is not published")
        for key, value in metrics.items():
            if not isinstance(value, float) or not math.isfinite(value):
                raise InvalidInput(f"metric {key!r} is not a finite number")
        if num_examples > 0 and "eval_loss" not in metrics:
            raise InvalidInput("an evaluation report with examples must carry eval_loss")
        fresh = self.state.add_client_eval(job_id, rnd, client.client_id, num_examples, metrics)
        if fresh:
            log.info("job %s round %d: %s evaluated on %d held-out examples (loss %s)", job_id, rnd,
                     client.client_id, num_examples, metrics.get("eval_loss"))
        return fresh

    def client_eval_summary(self, job_id: str, rnd: int) -> dict[str, float]:
        """The example-weighted mean of the clients' metrics of round ``rnd`` (``clients_eval_*``)."""
        return aggregate_client_evals(self.state.client_evals(job_id, rnd))

    # ------------------------------------------------------------------ secure aggregation
    def _secagg_member(self, client: Client, job_id: str, rnd: int, attempt: int, phase: str) -> tuple[SecAggRound, int]:
        """The attempt and this client's index, when the client may speak in ``phase`` now."""
        if job_id != client.job_id:
            raise PreconditionFailed(f"client {client.client_id} is not enrolled in job {job_id!r}")
        job = self.state.job(job_id)
        sec = self.state.secagg_round(job_id, rnd)
        if sec is None or rnd != job.current_round or sec.attempt != attempt or sec.phase != phase:
            raise PreconditionFailed(f"round {rnd} attempt {attempt} of job {job_id} is not in its {phase} phase")
        if client.client_id not in sec.members:
            raise PreconditionFailed(f"client {client.client_id} is not in the cohort of round {rnd}")
        return sec, sec.members.index(client.client_id)

    def secagg_message(self, client: Client, job_id: str, rnd: int, attempt: int, phase: str, payload: bytes,
                       signature: bytes, shares: list[bytes]) -> bool:
        """Checks and durably stores one protocol message. Returns False for a repeat."""
        sec, idx = self._secagg_member(client, job_id, rnd, attempt, phase)
        params = SecAggParams.from_bytes(sec.params)
        neighbours = params.graph[idx]
        if phase == "advertise":
            advert = verify_advert(payload, signature, client.sign_public_key)
            if advert.client_index != idx or advert.round_id != params.round_id:
                raise InvalidInput(f"key advert is for participant {advert.client_index} of another round or index")
        elif phase == "share":
            if len(shares) > len(neighbours):
                raise InvalidInput(f"{len(shares)} shares sent, participant {idx} has {len(neighbours)} neighbours")
            for raw in shares:
                share = EncryptedShare.from_bytes(raw)
                if share.sender != idx:
                    raise InvalidInput(f"share claims sender {share.sender}, the caller is participant {idx}")
                if share.receiver not in neighbours:
                    raise InvalidInput(f"share for unknown participant {share.receiver} (not a neighbour of {idx})")
            payload = join_shares(shares)
        elif phase == "unmask":
            answer = UnmaskShares.from_bytes(payload)
            if answer.sender != idx:
                raise InvalidInput(f"unmask shares claim sender {answer.sender}, the caller is participant {idx}")
            unknown = sorted((set(answer.b_shares) | set(answer.sk_shares)) - set(neighbours))
            if unknown:
                raise InvalidInput(f"unmask shares for unknown participant {unknown[0]} (not a neighbour of {idx})")
        else:
            raise InvalidInput(f"no {phase!r} message in secure aggregation")
        fresh = self.state.add_secagg_message(job_id, rnd, attempt, phase, idx, payload, signature)
        self.wake(job_id)
        return fresh

    def _check_masked_input(self, client: Client, inc: IncomingUpdate, plain: bytes) -> None:
        sec = self.state.secagg_round(inc.job_id, inc.round)
        if sec is None or sec.phase != "mask" or client.client_id not in sec.members:
            raise PreconditionFailed(f"round {inc.round} of job {inc.job_id} is not taking masked inputs")
        idx = sec.members.index(client.client_id)
        if self.state.secagg_outbox(inc.job_id, inc.round, sec.attempt, "mask", idx) is None:
            raise PreconditionFailed(f"participant {idx} did not share keys in time for round {inc.round}")
        masked = MaskedInput.from_bytes(plain)
        params = SecAggParams.from_bytes(sec.params)
        if masked.sender != idx:
            raise InvalidInput(f"masked input claims sender {masked.sender}, the caller is participant {idx}")
        if len(masked.vector) != params.vector_len:
            raise InvalidInput(f"masked vector has length {len(masked.vector)}, expected {params.vector_len}")

    # ------------------------------------------------------------------ adapters
    def adapter_dir(self, job_id: str, rnd: int) -> tuple[int, Path, dict]:
        """(round, path, manifest) of a published adapter; ``rnd`` 0 means the latest."""
        self.state.job(job_id)
        published = self.state.published(job_id)
        if not published:
            raise NotFound(f"job {job_id} has no published adapter yet")
        if rnd == 0:
            row = published[-1]
        else:
            rows = [p for p in published if p[1] == rnd]
            if not rows:
                raise NotFound(f"job {job_id} has no published adapter for round {rnd}")
            row = rows[0]
        return row[1], Path(row[2]), json.loads(row[3])

