"""Where a job's tensor work runs: combining a round's updates into the next global adapter, and
evaluating it.

In-process, it runs in the engine's thread; on Ray (:mod:`fedtune.cluster.jobs`) in the base's
compute actor, so engine actors move adapters only as safetensors bytes and never import torch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.state import Job
from fedtune.coordinator.strategies import WeightedDelta, get_strategy
from fedtune.methods import method_options
from fedtune.methods.base import METHOD_METRICS_METADATA, AfterAggregate
from fedtune.methods.lora import PRODUCT_ERROR_METADATA, LoraAggregation
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.privacy import DpNoise, add_gaussian_noise, clip_update
from fedtune.secagg.adapter_vector import unflatten_sum
from fedtune.tensor_blobs import Schema

if TYPE_CHECKING:
    from fedtune.coordinator.evaluator import Evaluator


def combine_updates(deltas: list[dict[str, torch.Tensor]], weights: list[int], strategy: str,
                    clip_norm: float | None) -> dict[str, torch.Tensor]:
    """Combines decoded deltas (of the job's shapes).

    Without ``clip_norm``: the strategy's weighted aggregate (FedAvg: the example-weighted mean).
    With it (central DP): the plain sum of the updates clipped to ``clip_norm``, to be noised.
    """
    if clip_norm is not None:
        clipped = [clip_update(d, clip_norm)[0] for d in deltas]
        return {k: torch.stack([c[k] for c in clipped]).sum(0) for k in deltas[0]}
    return get_strategy(strategy).aggregate([WeightedDelta(d, n) for d, n in zip(deltas, weights, strict=True)])


def decode_updates(plains: list[bytes], codec: str, schema: Schema,
                   lora: LoraAggregation | None = None) -> list[dict[str, torch.Tensor]]:
    """Each opened update as an fp32 delta, as its client sent it: the job's shapes, or for LoRA
    its client's rank and its mode's tensors (ffa: no A)."""
    decoder = get_codec(codec)
    return [decoder.decode(bytes_to_tensors(p), lora.update_schema(schema, i) if lora else schema)
            for i, p in enumerate(plains)]


def _next_state(current: dict[str, torch.Tensor], total: dict[str, torch.Tensor], denominator: float,
                dp: DpNoise | None, after: AfterAggregate | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``current`` plus ``total / denominator`` (noised first under DP), then the method's own step,
    and the blob metadata that carries its metrics.

    A tensor that ``total`` lacks (LoRA's frozen A under ffa) is carried over unchanged.
    """
    if dp is not None:
        total = add_gaussian_noise(total, dp.noise_multiplier, dp.clip_norm)
    new = {k: (current[k] + total[k] / denominator).contiguous() if k in total else current[k] for k in current}
    metadata = {"format": "pt"}
    if after is not None:
        # The method's own step on the aggregate (AdaLoRA: prune to the round's rank budget); its
        # metrics ride in the blob's metadata to the engine, which never imports torch.
        method, opts = method_options(after.peft)
        new, metrics = method.after_aggregate(opts, new, after.budget)
        metadata[METHOD_METRICS_METADATA] = json.dumps(metrics)
    return new, metadata


def _blob(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return tensors_to_bytes({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def client_states(current: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]],
                  lora: LoraAggregation) -> list[dict[str, torch.Tensor]]:
    """What each LoRA client ended its round with: the global factors cut to its rank plus its
    delta (a tensor it did not send, ffa's A, is the global one)."""
    from fedtune.methods.lora_aggregation import truncate_rank

    states = []
    for rank, delta in zip(lora.ranks, deltas, strict=True):
        start = truncate_rank(current, rank) if rank != lora.rank else current
        states.append({k: start[k] + delta[k] if k in delta else start[k] for k in start})
    return states


def product_error(states: list[dict[str, torch.Tensor]], weights: list[int], new: dict[str, torch.Tensor]) -> float:
    """‖mean(B·A) − B'·A'‖ / ‖mean(B·A)‖ over all LoRA modules of ``new`` (0 for ffa, which is
    exact; what factors and fedsa give up)."""
    from fedtune.methods.lora_aggregation import lora_pairs, product_mean

    mean = product_mean(states, [float(w) for w in weights])
    num = den = 0.0
    for module, (a, b) in lora_pairs(new).items():
        product = new[b].double() @ new[a].double()
        num += float((mean[module] - product).pow(2).sum())
        den += float(mean[module].pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def next_global(global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                strategy: str, dp: DpNoise | None, lora: LoraAggregation | None = None,
                after: AfterAggregate | None = None) -> bytes:
    """A round's new global adapter from the opened updates, as safetensors bytes.

    Without ``dp``: ``global_in`` plus the strategy's aggregate (FedAvg: the example-weighted mean
    of the deltas). With it: plus the noised sum of the updates clipped to its norm, over its
    planned cohort size.

    ``lora``: a LoRA job's mode and its clients' ranks. exact: the weighted mean of the clients'
    products B·A, re-factored to the job's rank by SVD (other tensors: their weighted mean). Other
    modes: each delta zero-padded to the job's rank (a lower-rank client leaves the components above
    its rank unchanged; HetLoRA's padding), then as above. Without DP the round's
    ``lora_product_error`` (exact: the SVD's truncation error) travels in the blob's metadata.
    """
    deltas = decode_updates(plains, codec, schema, lora)
    current = bytes_to_tensors(global_in)
    if lora is None:
        combined = combine_updates(deltas, weights, strategy, dp.clip_norm if dp else None)
        return _blob(*_next_state(current, combined, dp.planned if dp else 1.0, dp, after))
    from fedtune.methods.lora_aggregation import exact_aggregate, pad_rank

    states = client_states(current, deltas, lora)
    if lora.mode == "exact":
        new, error = exact_aggregate(states, [float(w) for w in weights], lora.rank)
        return _blob(new, {"format": "pt", PRODUCT_ERROR_METADATA: repr(float(error))})
    padded = [pad_rank(d, lora.rank) for d in deltas]
    combined = combine_updates(padded, weights, strategy, dp.clip_norm if dp else None)
    new, metadata = _next_state(current, combined, dp.planned if dp else 1.0, dp, after)
    if dp is None:
        metadata[PRODUCT_ERROR_METADATA] = repr(product_error(states, weights, new))
    return _blob(new, metadata)


def next_global_from_sum(global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                         dp: DpNoise | None, after: AfterAggregate | None = None) -> bytes:
    """A secure-aggregation round's new global adapter from its unmasked, decoded sum.

    ``total`` holds the survivors' summed weighted deltas and, last, their summed weights (see
    :mod:`fedtune.secagg.adapter_vector`); the mean divides by that sum, or under DP by the
    planned cohort size after noising.
    """
    sums, weight = unflatten_sum(total, schema, clip)
    return _blob(*_next_state(bytes_to_tensors(global_in), sums, dp.planned if dp else weight, dp, after))


class Compute(Protocol):
    """Runs a job's aggregation and evaluation."""

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: str, dp: DpNoise | None, lora: LoraAggregation | None = None,
                  after: AfterAggregate | None = None) -> bytes:
        """See :func:`next_global`."""
        ...

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None, after: AfterAggregate | None = None) -> bytes:
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
                  strategy: str, dp: DpNoise | None, lora: LoraAggregation | None = None,
                  after: AfterAggregate | None = None) -> bytes:
        return next_global(global_in, plains, weights, codec, schema, strategy, dp, lora, after)

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None, after: AfterAggregate | None = None) -> bytes:
        return next_global_from_sum(global_in, total, schema, clip, dp, after)

    def evaluate(self, job: Job, adapter: bytes | None) -> dict[str, float]:
        return self.evaluator.evaluate(job, None if adapter is None else bytes_to_tensors(adapter))

    def release(self, job_id: str) -> None:
        self.evaluator.release(job_id)
