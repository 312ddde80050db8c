"""One compute actor per base and node: the aggregation and evaluation of every job placed there.

Ray tasks would give each concurrent evaluation its own worker process, and each worker imports
torch, transformers and peft (about 330 MiB) and keeps the models it built; at small bases those
workers, not the base, are what N jobs cost. Here one threaded actor per base serves every CPU job
on it: its threads aggregate and evaluate side by side, the base is mapped once from the object
store, and evaluations that are waiting at the same moment run as one batch through
:class:`fedtune.batching.MultiLoraModel` (each job's adapter on its own rows of one forward pass).

A job's CPU quota is still what admits it (fedtune's scheduler starts a job only when its quota
fits), and it also sizes the actor's torch threads: the scheduler sets them to the sum of the CPU
quotas of the running jobs on the base (at least one, at most the node's cores), so evaluation
neither exceeds what was admitted nor runs on one thread when jobs were granted more. (The actor
itself reserves no CPU: Ray would otherwise start it with ``OMP_NUM_THREADS=1`` and keep it
there.) GPU evaluations run as Ray tasks that hold the job's GPUs (:mod:`fedtune.cluster.jobs`).

The actor runs on the node where its jobs' quotas are reserved, which need not be the
coordinator's: it gets the base's weights from the object store and the files it reads (the base's
config and tokenizer, each job's eval data) as :class:`fedtune.cluster.node_files.NodeFiles`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.coordinator.state import Job
from fedtune.methods.lora import plain_lora
from fedtune.spec import JobSpec

if TYPE_CHECKING:
    # Engines look this actor up by name, which imports this module: it imports torch only inside.
    import torch

    from fedtune.cluster.node_files import JobFiles, NodeFiles
    from fedtune.privacy import DpNoise
    from fedtune.tensor_blobs import Schema

log = logging.getLogger(__name__)

# Most adapters evaluated in one pass (each adds its rows to every forward).
DEFAULT_MAX_BATCH = 8
# Batched models kept, by the set of jobs in them (a skeleton over the shared base each: small).
_KEPT_BATCHES = 4
# Threads of the actor: aggregations and evaluation waits of that many jobs at once.
DEFAULT_CONCURRENCY = 32


@dataclass(eq=False)  # compared by identity: its fields hold tensors
class _Request:
    job: Job
    adapter: dict[str, torch.Tensor] | None
    done: Future[dict[str, float]] = field(default_factory=Future)


def batchable(job: Job, adapter: dict[str, torch.Tensor] | None) -> bool:
    """Whether an evaluation can share a pass with others: a federated LoRA job's adapter on the base,
    measured by its loss only.

    Offsite jobs (an emulator besides the base), the zero-shot evaluation and jobs whose
    ``evaluation.metrics`` go beyond loss and perplexity (generation and option scoring run per
    model, `fedtune.metrics`) take the one-job path.
    """
    if adapter is None or job.emulator_dir:
        return False
    spec = JobSpec.stored(job.spec_json)
    loss_only = set(spec.evaluation.metrics) <= {"loss", "perplexity"}
    return bool(spec.eval_data) and plain_lora(spec.peft.model_dump()) and not spec.tunes_blocks and loss_only


class EvalBatcher:
    """Evaluates jobs' adapters over one base, several at a time when they wait together.

    Callers block in :meth:`evaluate` from their own threads; one worker thread takes everything
    waiting, evaluates the batchable requests together (up to ``max_batch`` per pass) and the
    others one by one with ``evaluator``.
    """

    def __init__(self, evaluator: Any, base_dir: Path, load_base: Any, device: torch.device,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        """Args:
            evaluator: A :class:`fedtune.coordinator.evaluator.Evaluator` for the one-job path.
            base_dir: The base's files (config and tokenizer).
            load_base: ``(base_dir, device) -> model``, a fresh frozen base (a skeleton over shared weights).
            device: Where evaluation runs.
            max_batch: Most adapters per pass.
        """
        self.evaluator = evaluator
        self.base_dir = base_dir
        self.load_base = load_base
        self.device = device
        self.max_batch = max(1, max_batch)
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._models: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._data: dict[str, tuple[list[dict[str, list[int]]], int]] = {}
        self._tokenizer: Any = None
        self.passes: list[int] = []  # adapters per batched pass, for tests and logs
        self.threads = 0  # torch threads of a pass; 0 leaves torch's own setting
        self.pass_threads: list[int] = []  # torch threads each pass ran with, for tests
        self._worker = threading.Thread(target=self._work, name="eval-batcher", daemon=True)
        self._worker.start()

    def evaluate(self, job: Job, adapter: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """The job's eval metrics for ``adapter`` (see ``Evaluator.evaluate``); blocks until done."""
        return self.evaluate_many([(job, adapter)])[0]

    def evaluate_many(self, items: list[tuple[Job, dict[str, torch.Tensor] | None]]) -> list[dict[str, float]]:
        """Several evaluations handed over at once (so they can share passes); blocks until all are done."""
        requests = [_Request(job, adapter) for job, adapter in items]
        with self._cond:
            self._pending.extend(requests)
            self._cond.notify()
        return [r.done.result() for r in requests]

    def release(self, job_id: str) -> None:
        """Forgets a finished job's models and data."""
        self.evaluator.release(job_id)
        with self._cond:
            self._data.pop(job_id, None)
            for key in [k for k in self._models if job_id in k]:
                del self._models[key]

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                taken, self._pending = self._pending, []
            _use_threads(self.threads)
            self.pass_threads.append(_torch_threads())
            together: list[_Request] = []
            alone: list[_Request] = []
            for r in taken:
                (together if batchable(r.job, r.adapter) else alone).append(r)
            # One request per job in a pass: a job never has two evaluations waiting, but be safe.
            seen: set[str] = set()
            groups: list[list[_Request]] = [[]]
            for r in together:
                if r.job.job_id in seen or len(groups[-1]) >= self.max_batch:
                    groups.append([])
                    seen.clear()
                groups[-1].append(r)
                seen.add(r.job.job_id)
            for group in groups:
                if len(group) == 1:
                    alone.append(group[0])
                elif group:
                    self._run(group, self._batched)
            for r in alone:
                self._run([r], lambda rs: [self.evaluator.evaluate(rs[0].job, rs[0].adapter)])

    @staticmethod
    def _run(group: list[_Request], fn: Any) -> None:
        try:
            results = fn(group)
        except Exception as e:  # noqa: BLE001 - every waiting caller hears of the failure, as its own
            for r in group:
                r.done.set_exception(e)
            return
        for r, result in zip(group, results, strict=True):
            r.done.set_result(result)

    def _examples(self, job: Job) -> tuple[list[dict[str, list[int]]], int]:
        from fedtune.data import load_data, tokenize
        from fedtune.models import load_tokenizer

        with self._cond:
            cached = self._data.get(job.job_id)
        if cached is None:
            spec = JobSpec.stored(job.spec_json)
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.base_dir)
            tokenized = tokenize(load_data(Path(str(spec.eval_data)), spec.data), self._tokenizer,
                                 spec.training.max_seq_len, spec.data)
            cached = (tokenized, spec.training.batch_size)
            with self._cond:
                self._data[job.job_id] = cached
        return cached

    def _batched(self, group: list[_Request]) -> list[dict[str, float]]:
        from fedtune.batching import AdapterSpec, MultiLoraModel, evaluate_losses
        from fedtune.coordinator.evaluator import loss_metrics
        from fedtune.peft_io import lora_config

        key = tuple(sorted(r.job.job_id for r in group))
        group = sorted(group, key=lambda r: r.job.job_id)
        with self._cond:  # release() edits the cache from other threads
            model = self._models.get(key)
        if model is None:
            specs = [JobSpec.stored(r.job.spec_json) for r in group]
            adapters = [AdapterSpec("base", lora_config(s.peft.r, s.peft.alpha, s.peft.dropout,
                                                        s.peft.target_modules))
                        for s in specs]
            model = MultiLoraModel(self.load_base(self.base_dir, self.device), "base", adapters)
        with self._cond:
            self._models[key] = model
            self._models.move_to_end(key)
            while len(self._models) > _KEPT_BATCHES:
                self._models.popitem(last=False)
        for k, r in enumerate(group):
            assert r.adapter is not None
            model.load_state(k, r.adapter)
        data = [self._examples(r.job) for r in group]
        pad_id = self._tokenizer.pad_token_id
        losses = evaluate_losses(model, [d for d, _ in data], pad_id=pad_id,
                                 batch_size=min(b for _, b in data), device=self.device)
        self.passes.append(len(group))
        log.info("evaluated %d jobs' adapters in one pass: %s", len(group), ", ".join(key))
        return [loss_metrics("", loss) for loss in losses]


def _use_threads(n: int) -> None:
    """Sets torch's intra-op threads for the calling thread (with OpenMP the setting is per thread)."""
    if n > 0:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


class SharedCompute:
    """The body of a base's compute actor (made remote by :class:`fedtune.cluster.jobs.RayBackend`)."""

    def __init__(self, base: NodeFiles | str, base_refs: dict[str, Any]) -> None:
        """Args:
            base: The base's config and tokenizer (a path on this node, or files from the coordinator's).
            base_refs: The base's weights in the object store, by tensor name.
        """
        import ray
        import torch

        from fedtune.cluster.job_compute import base_files_path
        from fedtune.cluster.shared_base import build_from_shared, get_base
        from fedtune.coordinator.evaluator import Evaluator

        base_dir = base_files_path(base)
        arrays = get_base(ray, base_refs)
        device = torch.device("cpu")

        def load_base(d: Path, dev: torch.device) -> Any:
            return build_from_shared(d, arrays, dev)

        evaluator = Evaluator(lambda _job: Path(base_dir), device, load_base=load_base)
        self.batcher = EvalBatcher(evaluator, Path(base_dir), load_base, device,
                                   int(os.environ.get("FEDTUNE_EVAL_MAX_BATCH", DEFAULT_MAX_BATCH)))
        self._threads_lock = threading.Lock()
        self._threads_seq = 0

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def set_threads(self, cpus: float, seq: int) -> int:
        """Sizes evaluation and aggregation to ``cpus`` (the running jobs' summed quota): ``floor``,
        at least 1, at most the node's cores. ``seq`` orders calls that a threaded actor may run out
        of order; an older one is ignored. Returns the threads now in use."""
        with self._threads_lock:
            if seq > self._threads_seq:
                self._threads_seq = seq
                self.batcher.threads = max(1, min(int(cpus), os.cpu_count() or 1))
            return self.batcher.threads

    def threads(self) -> int:
        """The torch threads an evaluation pass uses (0 until the scheduler has set them)."""
        return self.batcher.threads

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: Any, dp: DpNoise | None, lora: Any = None,
                  after: Any = None) -> tuple[bytes, bytes | None]:
        """See :func:`fedtune.coordinator.compute.next_global`."""
        from fedtune.coordinator.compute import next_global

        _use_threads(self.batcher.threads)
        return next_global(global_in, plains, weights, codec, schema, strategy, dp, lora, after)

    def aggregate_sum(self, global_in: bytes, total: Any, schema: Schema, clip: float, dp: DpNoise | None,
                      after: Any = None, strategy: Any = None) -> tuple[bytes, bytes | None]:
        """See :func:`fedtune.coordinator.compute.next_global_from_sum` (``total``: a float64 vector)."""
        from fedtune.coordinator.compute import next_global_from_sum

        _use_threads(self.batcher.threads)
        return next_global_from_sum(global_in, total, schema, clip, dp, after, strategy)

    def evaluate(self, job: Job, adapter: bytes | None, files: JobFiles | None = None) -> dict[str, float]:
        """See :meth:`EvalBatcher.evaluate`; ``adapter`` as safetensors bytes, ``files``: the job's eval
        data and emulator when they come from another node."""
        from fedtune.cluster.node_files import localized
        from fedtune.peft_io import bytes_to_tensors

        return self.batcher.evaluate(localized(job, files), None if adapter is None else bytes_to_tensors(adapter))

    def node(self) -> dict[str, Any]:
        """Where this actor runs: its Ray node id and process id, and the resources that node has."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        resources: dict[str, float] = next((n.get("Resources", {}) for n in ray.nodes() if n["NodeID"] == node_id), {})
        return {"node_id": node_id, "pid": os.getpid(), "resources": resources}

    def release(self, job_id: str) -> None:
        """Frees what evaluation kept for a finished job."""
        self.batcher.release(job_id)
