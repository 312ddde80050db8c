"""A job's aggregation and evaluation on Ray, as its engine actor reaches them.

They run on the job's node (where its quota is reserved, :mod:`fedtune.cluster.placement`): in
the compute actor of the job's base on that node, or, for a GPU job's evaluation, as a Ray task
inside the job's reservation. When that node is not the coordinator's, what evaluation reads from
the coordinator's disk (the eval data, an offsite job's emulator) is sent once through the object
store (:mod:`fedtune.cluster.node_files`); the base's weights are there already.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.cluster.node_files import JobFiles, NodeFiles, job_files, local, localized
from fedtune.coordinator.state import Job
from fedtune.errors import FedtuneError
from fedtune.spec import JobSpec
from fedtune.strategies.base import StrategyRun

if TYPE_CHECKING:
    from fedtune.privacy import DpNoise
    from fedtune.tensor_blobs import Schema

# A call to a base's compute actor: how long it may take, and how long to wait for a replacement.
CALL_TIMEOUT_SECONDS = float(os.environ.get("FEDTUNE_COMPUTE_TIMEOUT_SECONDS", "3600"))
REPLACEMENT_WAIT_SECONDS = 60.0
# Jobs whose evaluation models one worker keeps (skeletons over the shared base: small).
_WORKER_JOBS = 8


def compute_actor_name(base_hash: str, node_id: str) -> str:
    """The Ray name of a base's compute actor on a node."""
    return f"fedtune-compute-{base_hash[:16]}-{node_id[:12]}"


@dataclass(frozen=True)
class Placement:
    """Where a job's compute runs, as its engine needs to know it."""

    node_id: str  # the job's node: its reservation and its base's compute actor there
    origin: str  # the coordinator's node (the engine's, with the state dir)
    compute_name: str
    group: Any = None  # the placement group holding the job's quota; GPU evaluation runs inside it


# ---------------------------------------------------------------------------------- in workers
_evaluators: OrderedDict[str, Any] = OrderedDict()


def _evaluate_task(job: Job, base: NodeFiles, base_refs: dict[str, Any], adapter: bytes | None, use_gpu: bool,
                   files: JobFiles | None) -> dict[str, float]:
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
        base_dir = local(base)
        evaluator = Evaluator(lambda _job: base_dir, device,
                              load_base=lambda d, dev: build_from_shared(d, arrays, dev))
        _evaluators[key] = evaluator
        while len(_evaluators) > _WORKER_JOBS:
            _evaluators.popitem(last=False)
    _evaluators.move_to_end(key)
    metrics: dict[str, float] = evaluator.evaluate(localized(job, files),
                                                   None if adapter is None else bytes_to_tensors(adapter))
    return metrics


class RayCompute:
    """A job's aggregation and evaluation: in its base's compute actor on the job's node, on GPUs as
    Ray tasks inside the job's reservation."""

    def __init__(self, ray: Any, base: NodeFiles, base_ref: list[Any], spec: JobSpec, placement: Placement) -> None:
        self.ray = ray
        self.base = base
        self.base_ref = base_ref  # a list, so Ray passes the reference on instead of resolving it here
        self.compute: Any = None  # found by name, again after a replacement
        self.compute_name = placement.compute_name
        self.placement = placement
        self._files: dict[str, JobFiles | None] = {}
        res = spec.resources
        self.use_gpu = res.gpus > 0
        options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": 2}
        if res.memory_gb:
            options["memory"] = int(res.memory_gb * 2**30)
        if placement.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement.group, 0)
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

    def files(self, job: Job) -> JobFiles | None:
        """The job's eval data and emulator for its node (sent once; None on the coordinator's node)."""
        if job.job_id not in self._files:
            self._files[job.job_id] = job_files(self.ray, job, self.placement.origin, self.placement.node_id)
        return self._files[job.job_id]

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
        files = self.files(job)
        if self.use_gpu:
            gpu: dict[str, float] = self.ray.get(
                self._evaluate_gpu.remote(job, self.base, self.base_ref[0], adapter, True, files),
                timeout=CALL_TIMEOUT_SECONDS)
            return gpu
        result: dict[str, float] = self._call("evaluate", job, adapter, files)
        return result

    def release(self, job_id: str) -> None:
        """The compute actor drops the job's models (GPU task workers evict theirs by LRU)."""
        self._call("release", job_id)


def base_files_path(base: NodeFiles | str) -> Path:
    """In a worker: the base's config and tokenizer directory on this node."""
    return local(base) if isinstance(base, NodeFiles) else Path(base)
