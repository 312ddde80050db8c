"""Where a job's heavy steps run: combining a round's updates and evaluating the new adapter.

In-process, they run in the engine's thread; on Ray (:mod:`fedtune.cluster.jobs`) they run as Ray
tasks with the job's resources, over a base model shared by every job on the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.state import Job
from fedtune.coordinator.strategies import WeightedDelta, get_strategy
from fedtune.peft_io import bytes_to_tensors
from fedtune.privacy import clip_update

if TYPE_CHECKING:
    from fedtune.coordinator.evaluator import Evaluator

Schema = dict[str, tuple[int, ...]]


def combine_updates(plains: list[bytes], weights: list[int], codec: str, schema: Schema, strategy: str,
                    clip_norm: float | None) -> dict[str, torch.Tensor]:
    """Decodes opened updates and combines them.

    Without ``clip_norm``: the strategy's weighted aggregate (FedAvg: the example-weighted mean).
    With it (central DP): the plain sum of the updates clipped to ``clip_norm``, to be noised.
    """
    decoder = get_codec(codec)
    deltas = [decoder.decode(bytes_to_tensors(p), schema) for p in plains]
    if clip_norm is not None:
        clipped = [clip_update(d, clip_norm)[0] for d in deltas]
        return {k: torch.stack([c[k] for c in clipped]).sum(0) for k in schema}
    return get_strategy(strategy).aggregate([WeightedDelta(d, n) for d, n in zip(deltas, weights, strict=True)])


class Compute(Protocol):
    """Runs a job's aggregation and evaluation."""

    def aggregate(self, plains: list[bytes], weights: list[int], codec: str, schema: Schema, strategy: str,
                  clip_norm: float | None) -> dict[str, torch.Tensor]:
        """See :func:`combine_updates`."""
        ...

    def evaluate(self, job: Job, adapter: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """See :meth:`Evaluator.evaluate`."""
        ...

    def release(self, job_id: str) -> None:
        """Frees what evaluation kept for a finished job."""
        ...


class InProcessCompute:
    """Aggregation and evaluation in the calling thread."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def aggregate(self, plains: list[bytes], weights: list[int], codec: str, schema: Schema, strategy: str,
                  clip_norm: float | None) -> dict[str, torch.Tensor]:
        return combine_updates(plains, weights, codec, schema, strategy, clip_norm)

    def evaluate(self, job: Job, adapter: dict[str, torch.Tensor] | None) -> dict[str, float]:
        return self.evaluator.evaluate(job, adapter)

    def release(self, job_id: str) -> None:
        self.evaluator.release(job_id)
