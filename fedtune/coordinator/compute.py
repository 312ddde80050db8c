"""Where a job's tensor work runs: combining a round's updates into the next global adapter, and
evaluating it.

In-process, it runs in the engine's thread; on Ray (:mod:`fedtune.cluster.jobs`) in the base's
compute actor, so engine actors move adapters only as safetensors bytes and never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.state import Job
from fedtune.coordinator.strategies import WeightedDelta, get_strategy
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.privacy import DpNoise, add_gaussian_noise, clip_update
from fedtune.secagg.adapter_vector import unflatten_sum
from fedtune.tensor_blobs import Schema

if TYPE_CHECKING:
    from fedtune.coordinator.evaluator import Evaluator


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


def apply_mean(global_in: bytes, total: dict[str, torch.Tensor], denominator: float,
               dp: DpNoise | None) -> bytes:
    """The next global adapter: ``global_in`` plus ``total / denominator`` (noised first under DP)."""
    if dp is not None:
        total = add_gaussian_noise(total, dp.noise_multiplier, dp.clip_norm)
    current = bytes_to_tensors(global_in)
    return tensors_to_bytes({k: (current[k] + total[k] / denominator).contiguous() for k in current},
                            metadata={"format": "pt"})


def next_global(global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                strategy: str, dp: DpNoise | None) -> bytes:
    """A round's new global adapter from the opened updates, as safetensors bytes.

    Without ``dp``: ``global_in`` plus the strategy's aggregate (FedAvg: the example-weighted mean
    of the deltas). With it: plus the noised sum of the updates clipped to its norm, over its
    planned cohort size.
    """
    combined = combine_updates(plains, weights, codec, schema, strategy, dp.clip_norm if dp else None)
    return apply_mean(global_in, combined, dp.planned if dp else 1.0, dp)


def next_global_from_sum(global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                         dp: DpNoise | None) -> bytes:
    """A secure-aggregation round's new global adapter from its unmasked, decoded sum.

    ``total`` holds the survivors' summed weighted deltas and, last, their summed weights (see
    :mod:`fedtune.secagg.adapter_vector`); the mean divides by that sum, or under DP by the
    planned cohort size after noising.
    """
    sums, weight = unflatten_sum(total, schema, clip)
    return apply_mean(global_in, sums, dp.planned if dp else weight, dp)


class Compute(Protocol):
    """Runs a job's aggregation and evaluation."""

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: str, dp: DpNoise | None) -> bytes:
        """See :func:`next_global`."""
        ...

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None) -> bytes:
        """See :func:`next_global_from_sum`."""
        ...

    def evaluate(self, job: Job, adapter: bytes | None) -> dict[str, float]:
        """See :meth:`Evaluator.evaluate`; ``adapter`` as safetensors bytes."""
        ...

    def release(self, job_id: str) -> None:
        """Frees what evaluation kept for a finished job."""
        ...


class InProcessCompute:
    """Aggregation and evaluation in the calling thread."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: str, dp: DpNoise | None) -> bytes:
        return next_global(global_in, plains, weights, codec, schema, strategy, dp)

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None) -> bytes:
        return next_global_from_sum(global_in, total, schema, clip, dp)

    def evaluate(self, job: Job, adapter: bytes | None) -> dict[str, float]:
        return self.evaluator.evaluate(job, None if adapter is None else bytes_to_tensors(adapter))

    def release(self, job_id: str) -> None:
        self.evaluator.release(job_id)
