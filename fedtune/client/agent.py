"""The client agent: join, then poll, fetch, train, and upload, round after round.

Private data is read and tokenized inside this process and never sent anywhere: the only things
that leave are the join request, heartbeats, download requests and adapter updates.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune import __version__
from fedtune.client.channel import ClientTls, is_tls_failure, is_transient, open_channel
from fedtune.client.local_base import BaseFile, verified_base
from fedtune.client.secure import SecureParticipant
from fedtune.client.transfer import BlobCache, materialize, upload
from fedtune.compression.codecs import get_codec
from fedtune.compression.feedback import ErrorFeedback
from fedtune.crypto.envelope import SCHEME as ENVELOPE_SCHEME
from fedtune.crypto.envelope import UpdateBinding, seal
from fedtune.crypto.keys import load_or_create, raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.data import Chat, DataFile, Example, read_data, tokenize
from fedtune.errors import (
    AuthError,
    FedtuneError,
    InvalidInput,
    LimitExceeded,
    StateConflict,
    Unavailable,
    from_rpc_error,
)
from fedtune.methods.client_plan import ClientPlan, client_plan
from fedtune.models import load_causal_lm, load_tokenizer, pick_device
from fedtune.peft_io import (
    adapter_state,
    build_peft_model,
    bytes_to_tensors,
    load_adapter_state,
    tensors_to_bytes,
)
from fedtune.privacy import clip_update
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from fedtune.secagg.adverts import WIRE_CODEC as SECAGG_CODEC
from fedtune.strategies import CLIENT_FEATURES
from fedtune.strategies.local import LocalObjective, ScaffoldObjective, control_tensors, local_objective
from fedtune.strategies.local import begin as begin_objective
from fedtune.training import (
    Recipe,
    TrainResult,
    check_micro_batch,
    count_steps,
    evaluate_loss,
    precision_dtype,
    recipe_from_training,
    resolve_precision,
    train_adapter,
)

log = logging.getLogger(__name__)

_SVC = "/fedtune.v1.ClientService/"
MAX_BACKOFF_SECONDS = 30.0
RPC_TIMEOUT_SECONDS = 30.0
# How long a first contact keeps retrying an unreachable coordinator before giving up (exit 5).
CONNECT_TIMEOUT_SECONDS = 60.0
# A heartbeat asks the coordinator to hold it this long when there is nothing to do (long-poll).
LONG_POLL_SECONDS = 20.0
# While a task runs, a background heartbeat keeps this client counted as connected.
PRESENCE_SECONDS = 1.0
# A Leave on the way out waits at most this long for the coordinator.
LEAVE_TIMEOUT_SECONDS = 5.0


@dataclass
class AgentStats:
    """What the agent did, for its exit summary and tests."""

    rounds: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass
class Prepared:
    """What a task needs before training: the model's files, this client's tokenized data, settings.

    Attributes:
        base_hash: Identity of the model the job trains on (base or emulator).
        model_dir: Its files, materialized from the verified cache.
        tokenized: This client's private examples, tokenized for the job.
        pad_id: Padding token id.
        training: The task's training settings (lr, batch_size, steps or epochs, seed, codec, ...).
        peft_config: The job's adapter config (r, alpha, dropout, target_modules, layers).
    """

    base_hash: str
    model_dir: Path
    tokenized: list[dict[str, list[int]]]
    pad_id: int
    training: dict[str, Any]
    peft_config: dict[str, Any]


_IMPORT_LOCK = threading.Lock()


def _import_training_libraries() -> None:
    """Imports transformers and peft (seconds), once per process, one thread at a time.

    The agent calls it right after joining, so a bad token, certificate or coordinator address is
    refused before paying for them. The lock matters where several agents share a process (a
    simulation's batched virtual clients): transformers' lazy module is not safe to import from
    two threads at once ("cannot import name 'AutoTokenizer'" in one of them).
    """
    with _IMPORT_LOCK:
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def train_seed(training: dict[str, Any], round_no: int) -> int:
    """The seed of a round's batch order: the job's seed plus the round (a new order each round)."""
    return int(training.get("seed", 0)) + round_no


class ClientAgent:
    """One data owner's agent for one job."""

    def __init__(self, coordinator: str, token: str | None, data: Path, state_dir: Path, tls: ClientTls,
                 device: str = "auto", name: str | None = None, progress: bool = True,
                 examples: list[Example | Chat] | DataFile | None = None, max_rank: int | None = None,
                 micro_batch: int | None = None, quantize: str | None = None, base_dir: Path | None = None,
                 eval_fraction: float | None = None, eval_data: Path | None = None,
                 eval_examples: list[Example | Chat] | DataFile | None = None,
                 connect_timeout: float | None = CONNECT_TIMEOUT_SECONDS) -> None:
        """``examples``: ``data`` already read with :func:`fedtune.data.read_data` (else read at :meth:`run`).
        ``max_rank``: train LoRA at most at this rank (small devices; the job's rank otherwise).
        ``micro_batch``: examples per forward pass (the job's batch is kept by accumulation).
        ``quantize``: load the base in nf4 or int8 where the job allows it.
        ``base_dir``: this data owner's own copy of the base (a model directory or a hub cache),
        checked file by file instead of downloaded.
        ``eval_fraction`` / ``eval_data``: held-out data for federated evaluation (a fraction of
        ``data``, left out of training, or a file of the same schema); only metrics leave.
        ``eval_examples``: the held-out data already read (and split off ``examples``).
        ``connect_timeout``: seconds a first contact retries an unreachable coordinator before
        :class:`Unavailable` (None or 0: retry for ever); once reached, outages are retried for ever."""
        if eval_fraction is not None and eval_data is not None:
            raise InvalidInput("pass --eval-fraction or --eval-data, not both")
        if eval_fraction is not None and not 0 < eval_fraction < 1:
            raise InvalidInput(f"--eval-fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
        self.eval_fraction = eval_fraction
        self.eval_data = eval_data
        self._eval_examples: list[Example | Chat] | DataFile = eval_examples or []
        self.max_rank = max_rank
        self.micro_batch = micro_batch
        self.quantize = quantize
        self.base_dir = base_dir
        self.address = coordinator
        self.tls = tls
        self.token = token
        self.data_path = data
        self.state_dir = state_dir
        self.device = pick_device(device)
        self.name = name or socket.gethostname()
        self.progress = progress
        self.stats = AgentStats()
        self.cache = BlobCache(state_dir / "cache")
        self._prepared: Prepared | None = None
        self._model: tuple[str, Any] | None = None  # (base hash, peft model), reused across rounds
        self._examples: list[Example | Chat] | DataFile = examples or []
        self._lock: IO[str] | None = None
        self._finished_tasks: set[str] = set()
        self._tasks_done = 0
        self._client_id = ""
        self._secure: SecureParticipant | None = None
        self.sign_key: Ed25519PrivateKey | None = None
        self.kx_key: X25519PrivateKey | None = None
        self.connect_timeout = connect_timeout
        self._reached = False  # some call of this process got an answer from the coordinator
        self._current_task = ""

    # ------------------------------------------------------------------ identity
    def _lock_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.state_dir / "agent.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateConflict(f"client state dir {self.state_dir} is in use by another agent") from None
        self._lock = handle

    @property
    def secure(self) -> SecureParticipant:
        """This agent's secure-aggregation sessions."""
        if self._secure is None:
            assert self.sign_key is not None
            self._secure = SecureParticipant(self.sign_key)
        return self._secure

    def _md(self, method: str) -> list[tuple[str, str]]:
        """Signed metadata for one call (fresh each time: the signature covers the time)."""
        assert self.sign_key is not None
        return sign_request(self.sign_key, _SVC + method, self._client_id)

    def enroll(self) -> str:
        """Joins (or reuses this state dir's identity) without running; returns the client id."""
        self._lock_state_dir()
        channel = open_channel(self.address, self.tls)
        try:
            return self._identity(pb_grpc.ClientServiceStub(channel))["client_id"]
        finally:
            channel.close()
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _identity(self, stub: pb_grpc.ClientServiceStub) -> dict[str, str]:
        # Long-term keys: Ed25519 signs every request, X25519 is the client's agreement key.
        self.sign_key = load_or_create(self.state_dir / "identity.ed25519.pem", Ed25519PrivateKey)  # type: ignore[type-abstract]
        self.kx_key = load_or_create(self.state_dir / "identity.x25519.pem", X25519PrivateKey)  # type: ignore[type-abstract]
        path = self.state_dir / "identity.json"
        if path.exists():
            ident = json.loads(path.read_text())
            if ident.get("coordinator") == self.address:
                return ident
        if not self.token:
            raise AuthError("no enrollment token: pass --token (this state dir has no identity for "
                            f"{self.address})")
        reply = self._call(lambda: stub.Join(pb.JoinRequest(
            token=self.token, client_name=self.name, agent_version=__version__, device=self.device.type,
            sign_public_key=raw_public_bytes(self.sign_key), kx_public_key=raw_public_bytes(self.kx_key),
            features=list(CLIENT_FEATURES),
        ), timeout=RPC_TIMEOUT_SECONDS))
        ident = {"coordinator": self.address, "client_id": reply.client_id, "job_id": reply.job_id}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ident))
        tmp.chmod(0o600)
        tmp.replace(path)
        log.info("joined job %s as %s", reply.job_id, reply.client_id)
        return ident

    # ------------------------------------------------------------------ the loop
    def _call(self, fn: Any) -> Any:
        """Runs an RPC, retrying with backoff while the coordinator is unreachable.

        Until the coordinator first answers, retries stop after ``connect_timeout`` (Unavailable,
        exit 5, saying whether the address refused or timed out), and transport settings that
        cannot work (plaintext against TLS, a missing client certificate) fail at once (AuthError).
        """
        delay = 0.5
        first_failure: float | None = None
        while True:
            try:
                out = fn()
                self._reached = True
                return out
            except grpc.RpcError as e:
                problem = self.tls.diagnose(e, self.address)
                if is_tls_failure(e) or (problem is not None and problem.credentials and not self._reached):
                    raise AuthError(problem.message if problem is not None else
                                    f"TLS with coordinator {self.address} failed: {e.details()}") from e
                if not is_transient(e):
                    raise from_rpc_error(e) from e
                what = problem.message if problem is not None else f"coordinator {self.address} unreachable " \
                                                                   f"({e.code().name})"
                if not self._reached and self.connect_timeout:
                    first_failure = time.monotonic() if first_failure is None else first_failure
                    waited = time.monotonic() - first_failure
                    if waited + delay > self.connect_timeout:
                        raise Unavailable(f"gave up after {waited:.0f} s (--connect-timeout "
                                          f"{self.connect_timeout:g}): {what}") from e
                log.warning("coordinator unreachable: %s; retrying in %.1fs", what, delay)
                time.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    @contextmanager
    def _present(self, stub: pb_grpc.ClientServiceStub, client_id: str, task_id: str) -> Iterator[None]:
        """Keeps this client counted as connected while it works on ``task_id`` (a heartbeat that
        carries the task every PRESENCE_SECONDS, on a background thread)."""
        stop = threading.Event()
        self._current_task = task_id

        def beat() -> None:
            while not stop.wait(PRESENCE_SECONDS):
                try:
                    stub.Heartbeat(pb.HeartbeatRequest(client_id=client_id, training_task_id=task_id),
                                   metadata=self._md("Heartbeat"), timeout=RPC_TIMEOUT_SECONDS)
                except grpc.RpcError as e:  # the work goes on; its upload retries on its own
                    log.debug("presence heartbeat failed: %s", e.code().name)

        thread = threading.Thread(target=beat, name="presence", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            self._current_task = ""

    def _leave(self, stub: pb_grpc.ClientServiceStub, client_id: str, reason: str) -> None:
        """Tells the coordinator this client is going (once, briefly: the process is stopping)."""
        try:
            reply = stub.Leave(pb.LeaveRequest(client_id=client_id, reason=reason, task_id=self._current_task),
                               metadata=self._md("Leave"), timeout=LEAVE_TIMEOUT_SECONDS)
            log.info("left the job: %s", reply.message)
        except grpc.RpcError as e:
            log.warning("could not tell the coordinator this client is leaving (%s): its task waits for the "
                        "round's deadline", e.code().name)

    def run(self, max_tasks: int | None = None, idle_seconds: float | None = None) -> AgentStats:
        """Runs until the job ends. Raises FedtuneError for what the user must fix.

        Args:
            max_tasks: Return after this many tasks have run to their end (a simulation's virtual
                client does one round and goes dormant).
            idle_seconds: With ``max_tasks``, also return after this long without anything to do.
        """
        # Validate the whole private data file before anything touches the network.
        if not self._examples:
            self._examples = read_data(self.data_path)
        if self.eval_data is not None and not self._eval_examples:
            self._eval_examples = read_data(self.eval_data)
            check_same_schema(self._examples, self._eval_examples, self.data_path, self.eval_data)
        elif self.eval_fraction is not None and not self._eval_examples:
            self._examples, self._eval_examples = split_holdout(self._examples, self.eval_fraction)
        self._lock_state_dir()
        channel = open_channel(self.address, self.tls)
        try:
            stub = pb_grpc.ClientServiceStub(channel)
            ident = self._identity(stub)
            client_id = self._client_id = ident["client_id"]
            _import_training_libraries()
            try:
                self._loop(stub, client_id, max_tasks, idle_seconds)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: the round should not wait for us
                self._leave(stub, client_id, "interrupted")
                raise
            return self.stats
        finally:
            channel.close()
            if self._lock is not None:
                self._lock.close()

    def _loop(self, stub: pb_grpc.ClientServiceStub, client_id: str, max_tasks: int | None,
              idle_seconds: float | None) -> None:
        idle_since = time.monotonic()
        while max_tasks is None or self._tasks_done < max_tasks:
            idle = time.monotonic() - idle_since
            if idle_seconds is not None and idle > idle_seconds:
                return
            # Long-poll: the coordinator answers as soon as there is something to do.
            wait = LONG_POLL_SECONDS if idle_seconds is None else max(0.0, min(LONG_POLL_SECONDS, idle_seconds - idle))
            reply = self._call(lambda w=wait: stub.Heartbeat(pb.HeartbeatRequest(client_id=client_id, wait_seconds=w),
                                                             metadata=self._md("Heartbeat"),
                                                             timeout=RPC_TIMEOUT_SECONDS + w))
            if reply.action == pb.HeartbeatReply.STOP:
                log.info("coordinator says stop: %s", reply.message)
                return
            if reply.action == pb.HeartbeatReply.TRAIN and reply.task.task_id not in self._finished_tasks:
                with self._present(stub, client_id, reply.task.task_id):
                    self._run_task(stub, client_id, reply.task)
                idle_since = time.monotonic()
                continue
            if reply.action == pb.HeartbeatReply.EVALUATE:
                with self._present(stub, client_id, reply.task.task_id):
                    self._evaluate(stub, reply.task)
                idle_since = time.monotonic()
                continue
            if reply.action == pb.HeartbeatReply.SECAGG:
                with self._present(stub, client_id, reply.secagg.task_id):
                    self._secure_step(stub, client_id, reply.secagg)
                idle_since = time.monotonic()
                continue
            # 0: the coordinator held the call (long-poll) and there is still nothing: ask again now.
            if reply.retry_after_seconds > 0:
                time.sleep(min(reply.retry_after_seconds, 10.0))

    # ------------------------------------------------------------------ one task
    def _fetch(self, stub: pb_grpc.ClientServiceStub, ref: pb.FileRef) -> Path:
        path, got = self._call(lambda: self.cache.fetch(stub, self._md("Download"), ref.sha256, ref.size, ref.path,
                                                        progress=self.progress))
        self.stats.bytes_down += got
        return path

    def _prepare(self, stub: pb_grpc.ClientServiceStub, task: pb.Task) -> Prepared:
        """Fetches what the task's model lacks and tokenizes the private data (cached per model)."""
        training = json.loads(task.training_json)
        peft_config = json.loads(task.peft_config_json)
        training["client_quantization"] = self._quantization(training)
        # What this client cannot run is refused before anything is fetched or trained.
        resolve_precision(str(training.get("precision", "auto")), self.device)
        check_micro_batch(self.micro_batch, int(training["batch_size"]))
        if self._prepared is not None and self._prepared.base_hash == task.base_model_hash:
            return replace(self._prepared, training=training, peft_config=peft_config)
        target = self.state_dir / "models" / task.base_model_hash[:16]
        if self.base_dir is not None and not any(f.path == "emulator.json" for f in task.base_files):
            model_dir = verified_base(self.base_dir, [BaseFile(f.path, f.sha256, f.size) for f in task.base_files],
                                      target.with_name(target.name + "-local"), self.state_dir / "base-hashes.json")
        else:
            if self.base_dir is not None:
                log.warning("offsite job: the coordinator sends its emulator; --base-dir is not used")
            for ref in task.base_files:
                self._fetch(stub, ref)
            model_dir = materialize(self.cache, [(f.path, f.sha256) for f in task.base_files], target)
        tokenizer = load_tokenizer(model_dir)
        tokenized = tokenize(self._examples, tokenizer, int(training["max_seq_len"]), training.get("data"),
                             packing=bool(training.get("packing")))
        if not any(any(label != -100 for label in ex["labels"]) for ex in tokenized):
            raise InvalidInput(f"{self.data_path}: no example has response tokens within max_seq_len "
                               f"{training['max_seq_len']}")
        self._prepared = Prepared(task.base_model_hash, model_dir, tokenized, tokenizer.pad_token_id, training,
                                  peft_config)
        return self._prepared

    def _quantization(self, training: dict[str, Any]) -> str | None:
        """How this client loads the base: the job's quantization, or its own where the job allows."""
        job = training.get("client_quantization")
        if self.quantize is None:
            return None if job == "allowed" else job
        if job == "allowed" or job == self.quantize:
            return self.quantize
        if job is None:
            raise InvalidInput(f"--quantize {self.quantize}: this job does not let clients quantize the base "
                               "(its client_quantization is not set to allowed)")
        raise InvalidInput(f"--quantize {self.quantize}: this job loads the base in {job}; drop --quantize")

    def _plan(self, prepared: Prepared) -> ClientPlan:
        """How this client trains the task's adapter (its rank, what it keeps, what it sends)."""
        # One file per enrollment: a fedsa client's own B belongs to its job.
        personal = self.state_dir / "personal" / f"{self._client_id or 'client'}.safetensors"
        return client_plan(prepared.peft_config, self.max_rank, personal)

    def _peft_model(self, prepared: Prepared) -> Any:
        """The job's peft model on this agent's device, loaded once per model."""
        if self._model is not None and self._model[0] == prepared.base_hash:
            return self._model[1]
        self._model = None  # another model: let the old one go before loading
        model_dir, quantize = prepared.model_dir, prepared.training.get("client_quantization")
        if (model_dir / "emulator.json").exists():
            # Offsite job: an emulator (possibly with a quantized middle), never the full model.
            from fedtune.compression.emulator_storage import load_emulator

            base = load_emulator(model_dir, self.device)
        elif quantize:
            # QLoRA: the frozen base in nf4/int8 (bitsandbytes), LoRA in full precision on top.
            from fedtune.quantization import load_quantized_causal_lm

            base = load_quantized_causal_lm(model_dir, self.device, quantize)
        else:
            # Half precision: the frozen base is stored in it too (half the memory); fp32 otherwise.
            precision = resolve_precision(str(prepared.training.get("precision", "auto")), self.device)
            base = load_causal_lm(model_dir, self.device, precision_dtype(precision))
        cfg = prepared.peft_config
        blocks = cfg.get("tune") == "blocks"
        plan = self._plan(prepared)
        model = build_peft_model(base, config=None if blocks else plan.peft_config(),
                                 layers=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
                                 whole_blocks=blocks)
        plan.prepare(model)
        self._model = (prepared.base_hash, model)
        return model

    def recipe(self, prepared: Prepared, task: pb.Task, micro_batch: int | None = None) -> Recipe:
        """How this client takes each step of the task's round (the job's recipe on this device)."""
        t = prepared.training
        steps = count_steps(len(prepared.tokenized), int(t["batch_size"]), t.get("steps"), t.get("epochs"))
        return recipe_from_training(t, round_no=task.round, steps=steps, device=self.device,
                                    micro_batch=micro_batch or self.micro_batch)

    def _scaffold_path(self, job_id: str) -> Path:
        """Where this client keeps its SCAFFOLD control variate for a job (across rounds and restarts)."""
        return self.state_dir / "scaffold" / f"{job_id}-{self._client_id or 'client'}.safetensors"

    def _objective(self, stub: pb_grpc.ClientServiceStub, prepared: Prepared, task: pb.Task) -> LocalObjective | None:
        """The task's client-side strategy (FedProx, SCAFFOLD), or None."""
        strategy = prepared.training.get("strategy")
        if not strategy:
            return None
        server = None
        if strategy.get("name") == "scaffold":
            plan = self._plan(prepared)
            if plan.rank != plan.job_rank:
                raise InvalidInput(f"--max-rank {self.max_rank}: this job uses scaffold, whose control variates "
                                   "have the job's LoRA rank; drop --max-rank")
            if task.strategy_state.sha256:
                server = bytes_to_tensors(self._fetch(stub, task.strategy_state).read_bytes())
        return local_objective(prepared.training, server, self._scaffold_path(task.job_id))

    def _train(self, prepared: Prepared, global_state: dict[str, torch.Tensor],
               task: pb.Task, stub: pb_grpc.ClientServiceStub | None = None,
               ) -> tuple[TrainResult, dict[str, torch.Tensor], LocalObjective | None]:
        """Trains the adapter from the global one on the private data; returns its summary and weights.

        The local loop of one agent; a simulation's batched virtual clients train several agents'
        adapters in one pass instead (:mod:`fedtune.simulation.batched`).
        """
        model = self._peft_model(prepared)
        t = prepared.training
        micro = self.micro_batch
        for attempt in (1, 2):
            load_adapter_state(model, self._plan(prepared).start(global_state))
            recipe = self.recipe(prepared, task, micro)
            objective = self._objective(stub, prepared, task) if stub is not None else None
            if objective is not None:
                begin_objective(objective, model)
            try:
                result = train_adapter(
                    model, prepared.tokenized, pad_id=prepared.pad_id, lr=float(t["lr"]),
                    batch_size=int(t["batch_size"]), steps=t.get("steps"), epochs=t.get("epochs"),
                    seed=train_seed(t, task.round), device=self.device, progress=self.progress,
                    desc=f"round {task.round}", recipe=recipe, objective=objective,
                )
                return result, adapter_state(model), objective
            except torch.OutOfMemoryError:
                size = recipe.micro_batch or min(int(t["batch_size"]), len(prepared.tokenized))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if attempt == 2 or size < 2:
                    raise LimitExceeded(
                        f"round {task.round}: out of memory on {self.device} at micro-batch {size}; pass a smaller "
                        "--micro-batch, --quantize nf4 where the job allows it, or ask for "
                        "training.gradient_checkpointing") from None
                # The largest divisor of the job's batch at most half the size that ran out.
                batch = int(t["batch_size"])
                micro = max(d for d in range(1, size // 2 + 1) if batch % d == 0)
                log.warning("round %d: out of memory at micro-batch %d; retrying once at %d", task.round, size, micro)
        raise AssertionError("unreachable")

    def _run_task(self, stub: pb_grpc.ClientServiceStub, client_id: str, task: pb.Task) -> None:
        if task.deadline_unix and time.time() > task.deadline_unix:
            log.warning("round %d: task %s is past its deadline; skipped", task.round, task.task_id)
            self._finished_tasks.add(task.task_id)
            return
        log.info("round %d: task %s", task.round, task.task_id)
        t0 = time.perf_counter()
        prepared = self._prepare(stub, task)
        global_path = self._fetch(stub, task.global_adapter)
        fetch_seconds = time.perf_counter() - t0
        global_state = bytes_to_tensors(global_path.read_bytes())
        training = prepared.training
        result, trained, objective = self._train(prepared, global_state, task, stub)
        t1 = time.perf_counter()
        codec = get_codec(training.get("codec", "fp32"))
        plan = self._plan(prepared)
        secure = bool(task.secagg.params)
        delta = plan.delta(trained, global_state, pad=secure)
        plan.finish(trained)
        feedback = None
        if not codec.additive:
            # What a lossy codec leaves out this round is carried into the next (error feedback),
            # kept in the state dir so a restart does not lose it.
            feedback = ErrorFeedback(self.state_dir / "feedback" / f"{task.job_id}.safetensors")
            delta = feedback.apply(delta)
        privacy = json.loads(task.privacy_json) if task.privacy_json else None
        if privacy is not None:
            delta, norm = clip_update(delta, float(privacy["clip_norm"]))
            log.info("round %d: update norm %.4g clipped to %.4g for DP", task.round, norm, privacy["clip_norm"])
        metrics = {"train_loss": result.mean_loss, "final_loss": result.final_loss, "train_seconds": result.seconds,
                   "steps": float(result.steps), "fetch_seconds": fetch_seconds, **plan.metrics(pad=secure)}
        if secure:
            self._finished_tasks.add(task.task_id)
            message = self.secure.begin(task, delta, result.num_examples, privacy is not None, metrics)
            self._send_secagg(stub, message)
            log.info("round %d: trained (loss %.4f); secure aggregation attempt %d started", task.round,
                     result.mean_loss, task.secagg.attempt)
            return
        # Same key for every retry of this task, across restarts too: the coordinator stores it once.
        update_id = hashlib.sha256(f"{client_id}:{task.task_id}".encode()).hexdigest()[:32]
        wire = codec.encode(delta)
        if feedback is not None:
            feedback.update(codec.decode(wire, {k: tuple(v.shape) for k, v in delta.items()}), delta)
        pending = None
        if isinstance(objective, ScaffoldObjective):
            # c_i⁺ is kept only once the update is accepted, so a retried task starts from the same c_i.
            new_variate = objective.new_variate(trained, sorted(delta))
            change = {k: v - objective.own.get(k, torch.zeros_like(v)) for k, v in new_variate.items()}
            change |= {k: torch.zeros_like(v) for k, v in delta.items() if k not in change}
            wire = {**wire, **control_tensors(change)}
            pending = new_variate
        plain = tensors_to_bytes(wire, metadata={"codec": codec.name})
        payload = seal(plain, task.job_public_key, UpdateBinding(task.job_id, task.round, client_id, update_id))
        pack_seconds = time.perf_counter() - t1
        header = pb.UpdateHeader(
            job_id=task.job_id, round=task.round, task_id=task.task_id, update_id=update_id,
            num_examples=result.num_examples, total_size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(), codec=codec.name, envelope=ENVELOPE_SCHEME,
            metrics={**metrics, "pack_seconds": pack_seconds},
        )
        t2 = time.perf_counter()
        self._tasks_done += 1
        try:
            reply = self._call(lambda: upload(stub, self._md("Upload"), header, payload))
        except FedtuneError as e:
            self._finished_tasks.add(task.task_id)
            if isinstance(e, AuthError):
                raise
            # The round closed or the update was refused: nothing to retry, wait for the next task.
            log.warning("round %d: update not accepted: %s", task.round, e)
            return
        self._finished_tasks.add(task.task_id)
        if pending is not None:
            save_tensors(pending, self._scaffold_path(task.job_id))
        self.stats.bytes_up += len(payload)
        self.stats.rounds.append(task.round)
        log.info("round %d: update %s %s (%d bytes in %.2fs, train loss %.4f)", task.round, update_id,
                 "already stored" if reply.duplicate else "accepted", len(payload), time.perf_counter() - t2,
                 result.mean_loss)

    # ------------------------------------------------------------------ federated evaluation
    def _evaluate(self, stub: pb_grpc.ClientServiceStub, task: pb.Task) -> None:
        """Evaluates a published round's adapter on the held-out data and reports the metrics only."""
        job_id, rnd = task.job_id, task.round
        metrics: dict[str, float] = {}
        n = 0
        if self._eval_examples:
            prepared = self._prepare(stub, task)
            global_state = bytes_to_tensors(self._fetch(stub, task.global_adapter).read_bytes())
            evaluation = json.loads(task.evaluation_json or "{}")
            metrics, n = self.evaluate_held_out(prepared, global_state, evaluation)
            log.info("round %d: global adapter on %d held-out examples: loss %.4f", rnd, n, metrics["eval_loss"])
        try:
            self._call(lambda: stub.ReportEval(pb.EvalReport(job_id=job_id, round=rnd, num_examples=n, metrics=metrics),
                                               metadata=self._md("ReportEval"), timeout=RPC_TIMEOUT_SECONDS))
        except FedtuneError as e:
            if isinstance(e, AuthError):
                raise
            log.warning("round %d: evaluation not accepted: %s", rnd, e)

    def evaluate_held_out(self, prepared: Prepared, global_state: dict[str, torch.Tensor],
                          evaluation: dict[str, Any]) -> tuple[dict[str, float], int]:
        """The metrics of ``global_state`` (as this client trains it: its rank, its own B) on the
        held-out data, and the number of examples they cover."""
        model = self._peft_model(prepared)
        load_adapter_state(model, self._plan(prepared).start(global_state))
        t = prepared.training
        tokenizer = load_tokenizer(prepared.model_dir)
        held = tokenize(self._eval_examples, tokenizer, int(t["max_seq_len"]), t.get("data"))
        loss = evaluate_loss(model, held, pad_id=prepared.pad_id, batch_size=int(t["batch_size"]), device=self.device)
        metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        names = [m for m in evaluation.get("metrics", []) if m not in ("loss", "perplexity")]
        if names:
            from fedtune.metrics import evaluate_metrics

            # A metric this client's records cannot score (choice_accuracy on pairs) is left out,
            # not an error: each client's data is its own.
            metrics |= evaluate_metrics(model, tokenizer, self._eval_examples, names, data=t.get("data"),
                                        max_seq_len=int(t["max_seq_len"]), batch_size=int(t["batch_size"]),
                                        device=self.device, max_new_tokens=int(evaluation.get("max_new_tokens", 32)),
                                        strict=False)
        return metrics, int(getattr(held, "examples", 0) or len(held))

    # ------------------------------------------------------------------ secure aggregation
    def _send_secagg(self, stub: pb_grpc.ClientServiceStub, message: pb.SecAggMessage) -> bool:
        try:
            self._call(lambda: stub.SecAgg(message, metadata=self._md("SecAgg"), timeout=RPC_TIMEOUT_SECONDS))
            return True
        except FedtuneError as e:
            if isinstance(e, AuthError):
                raise
            log.warning("round %d: secure-aggregation step not accepted: %s", message.round, e)
            return False

    def _secure_step(self, stub: pb_grpc.ClientServiceStub, client_id: str, step: pb.SecAggStep) -> None:
        message, masked, attempt = self.secure.respond(step)
        if attempt is None:
            time.sleep(0.3)  # no session for this attempt (restarted agent): a dropout, wait it out
            return
        if message is not None:
            self._send_secagg(stub, message)
            if step.phase == pb.UNMASK:
                self.stats.rounds.append(step.round)
                self._tasks_done += 1
            return
        assert masked is not None
        task = attempt.task
        update_id = hashlib.sha256(f"{client_id}:{task.task_id}:{step.attempt}".encode()).hexdigest()[:32]
        payload = seal(masked, task.job_public_key, UpdateBinding(task.job_id, task.round, client_id, update_id))
        header = pb.UpdateHeader(
            job_id=task.job_id, round=task.round, task_id=task.task_id, update_id=update_id,
            # The example count travels inside the masked vector (as the client's weight), not here.
            num_examples=1, total_size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
            codec=SECAGG_CODEC, envelope=ENVELOPE_SCHEME, metrics=attempt.metrics,
        )
        try:
            self._call(lambda: upload(stub, self._md("Upload"), header, payload))
            self.stats.bytes_up += len(payload)
        except FedtuneError as e:
            if isinstance(e, AuthError):
                raise
            log.warning("round %d: masked input not accepted: %s", task.round, e)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Writes tensors to a safetensors file atomically (a crash leaves the old file or the new one)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _records(data: list[Example | Chat] | DataFile) -> list[Any]:
    return list(data.records) if isinstance(data, DataFile) else list(data)


def split_holdout(data: list[Example | Chat] | DataFile, fraction: float,
                  ) -> tuple[list[Example | Chat] | DataFile, list[Example | Chat] | DataFile]:
    """(training, held-out) parts of a client's data: ``ceil(fraction · n)`` records, chosen by a
    fixed shuffle so the split is the same on every run, are held out and never trained on.

    Raises:
        InvalidInput: too few records to hold any out and still train.
    """
    n = len(data)
    held = math.ceil(fraction * n)
    if n < 2 or held >= n:
        raise InvalidInput(f"--eval-fraction {fraction}: {n} example(s) leave none to train on")
    order = list(range(n))
    random.Random(f"fedtune-holdout-{n}").shuffle(order)
    out, keep = sorted(order[:held]), sorted(order[held:])
    if isinstance(data, DataFile):
        return (replace(data, records=tuple(data.records[i] for i in keep), numbers=tuple(data.numbers[i] for i in keep)),
                replace(data, records=tuple(data.records[i] for i in out), numbers=tuple(data.numbers[i] for i in out)))
    return [data[i] for i in keep], [data[i] for i in out]


def _kinds(data: list[Example | Chat] | DataFile) -> set[str]:
    from fedtune.data.schemas import DEFAULT_COLUMNS, detect_schema

    kinds = set()
    for r in _records(data):
        if isinstance(r, dict):
            kinds.add(detect_schema(r, DEFAULT_COLUMNS) or "columns:" + ",".join(sorted(r)))
        else:
            kinds.add("chat" if isinstance(r, Chat) else "pair")
    return kinds


def check_same_schema(train: list[Example | Chat] | DataFile, held: list[Example | Chat] | DataFile,
                      train_path: Path, held_path: Path) -> None:
    """Refuses held-out data whose records are of another schema than the training data's.

    Raises:
        InvalidInput: naming both files and their schemas.
    """
    a, b = _kinds(train), _kinds(held)
    if not a & b:
        raise InvalidInput(f"--eval-data {held_path} holds {', '.join(sorted(b))} records and {train_path} holds "
                           f"{', '.join(sorted(a))}: held-out data must be of the training data's schema")
