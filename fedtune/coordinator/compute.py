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


def combine_updates(plains: list[bytes], weights: list[int], codec: str, schema: Schema, strategy: str,
                    clip_norm: float | None, lora: LoraAggregation | None = None) -> dict[str, torch.Tensor]:
    """Decodes opened updates and combines them.

    Without ``clip_norm``: the strategy's weighted aggregate (FedAvg: the example-weighted mean).
    With it (central DP): the plain sum of the updates clipped to ``clip_norm``, to be noised.
    With ``lora``: each update is decoded at its client's rank and zero-padded to the job's (a
    lower-rank client leaves the components above its rank unchanged; HetLoRA's padding), and
    under ffa only B's deltas are there (A is never updated).
    """
    deltas = decode_updates(plains, codec, schema, lora)
    keys = list(deltas[0])
    if clip_norm is not None:
        clipped = [clip_update(d, clip_norm)[0] for d in deltas]
        return {k: torch.stack([c[k] for c in clipped]).sum(0) for k in keys}
    return get_strategy(strategy).aggregate([WeightedDelta(d, n) for d, n in zip(deltas, weights, strict=True)])


def decode_updates(plains: list[bytes], codec: str, schema: Schema,
                   lora: LoraAggregation | None = None) -> list[dict[str, torch.Tensor]]:
    """Each opened update as an fp32 delta with the job's shapes (LoRA: padded to the job's rank)."""
    decoder = get_codec(codec)
    if lora is None:
        return [decoder.decode(bytes_to_tensors(p), schema) for p in plains]
    from fedtune.methods.lora_aggregation import pad_rank

    return [pad_rank(decoder.decode(bytes_to_tensors(p), lora.update_schema(schema, i)), lora.rank)
            for i, p in enumerate(plains)]


def apply_mean(global_in: bytes, total: dict[str, torch.Tensor], denominator: float,
               dp: DpNoise | None, after: AfterAggregate | None = None) -> bytes:
    """The next global adapter: ``global_in`` plus ``total / denominator`` (noised first under DP).

    A tensor that ``total`` lacks (LoRA's frozen A under ffa) is carried over unchanged.
    """
    if dp is not None:
        total = add_gaussian_noise(total, dp.noise_multiplier, dp.clip_norm)
    current = bytes_to_tensors(global_in)
    new = {k: (current[k] + total[k] / denominator).contiguous() if k in total else current[k] for k in current}
    metadata = {"format": "pt"}
    if after is not None:
        # The method's own step on the aggregate (AdaLoRA: prune to the round's rank budget); its
        # metrics ride in the blob's metadata to the engine, which never imports torch.
        method, opts = method_options(after.peft)
        new, metrics = method.after_aggregate(opts, new, after.budget)
        metadata[METHOD_METRICS_METADATA] = json.dumps(metrics)
    return tensors_to_bytes({k: v.contiguous() for k, v in new.items()}, metadata=metadata)


def exact_lora_global(global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                      lora: LoraAggregation) -> bytes:
    """An ``aggregation.lora: exact`` round: the weighted mean of the clients' products B·A,
    re-factored to the job's rank by SVD (other tensors: their weighted mean).

    Each client's factors are the global ones cut to its rank plus its delta. The relative
    truncation error of the re-factoring travels in the blob's metadata (see PRODUCT_ERROR_METADATA).
    """
    from fedtune.methods.lora_aggregation import exact_aggregate

    states = _client_states(global_in, plains, codec, schema, lora)
    new, error = exact_aggregate(states, [float(w) for w in weights], lora.rank)
    return tensors_to_bytes({k: v.contiguous() for k, v in new.items()},
                            metadata={"format": "pt", PRODUCT_ERROR_METADATA: repr(float(error))})


def next_global(global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                strategy: str, dp: DpNoise | None, lora: LoraAggregation | None = None,
                after: AfterAggregate | None = None) -> bytes:
    """A round's new global adapter from the opened updates, as safetensors bytes.

    Without ``dp``: ``global_in`` plus the strategy's aggregate (FedAvg: the example-weighted mean
    of the deltas). With it: plus the noised sum of the updates clipped to its norm, over its
    planned cohort size. ``lora``: a LoRA job's aggregation mode and its clients' ranks.
    """
    if lora is not None and lora.mode == "exact":
        return exact_lora_global(global_in, plains, weights, codec, schema, lora)
    combined = combine_updates(plains, weights, codec, schema, strategy, dp.clip_norm if dp else None, lora)
    out = apply_mean(global_in, combined, dp.planned if dp else 1.0, dp, after)
    if lora is not None and dp is None:
        out = _with_product_error(out, global_in, plains, weights, codec, schema, lora)
    return out


def _client_states(global_in: bytes, plains: list[bytes], codec: str, schema: Schema,
                   lora: LoraAggregation) -> list[dict[str, torch.Tensor]]:
    # What each client ended its round with: the global factors at its rank plus its delta.
    from fedtune.methods.lora_aggregation import truncate_rank

    decoder = get_codec(codec)
    current = bytes_to_tensors(global_in)
    states = []
    for i, plain in enumerate(plains):
        delta = decoder.decode(bytes_to_tensors(plain), lora.update_schema(schema, i))
        start = truncate_rank(current, lora.ranks[i]) if lora.ranks[i] != lora.rank else current
        states.append({k: start[k] + delta.get(k, 0) for k in start})
    return states


def _with_product_error(out: bytes, global_in: bytes, plains: list[bytes], weights: list[int], codec: str,
                        schema: Schema, lora: LoraAggregation) -> bytes:
    """``out`` with its distance from the exact aggregate in its metadata: ‖mean(B·A) − B'·A'‖ / ‖mean(B·A)‖
    over all LoRA modules (0 for ffa, which is exact; what factors and fedsa give up)."""
    from fedtune.methods.lora_aggregation import lora_pairs, product_mean

    mean = product_mean(_client_states(global_in, plains, codec, schema, lora), [float(w) for w in weights])
    new = bytes_to_tensors(out)
    num = den = 0.0
    for module, (a, b) in lora_pairs(new).items():
        product = new[b].double() @ new[a].double()
        num += float((mean[module] - product).pow(2).sum())
        den += float(mean[module].pow(2).sum())
    error = (num / den) ** 0.5 if den > 0 else 0.0
    return tensors_to_bytes(new, metadata={"format": "pt", PRODUCT_ERROR_METADATA: repr(error)})


def next_global_from_sum(global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                         dp: DpNoise | None, after: AfterAggregate | None = None) -> bytes:
    """A secure-aggregation round's new global adapter from its unmasked, decoded sum.

    ``total`` holds the survivors' summed weighted deltas and, last, their summed weights (see
    :mod:`fedtune.secagg.adapter_vector`); the mean divides by that sum, or under DP by the
    planned cohort size after noising.
    """
    sums, weight = unflatten_sum(total, schema, clip)
    return apply_mean(global_in, sums, dp.planned if dp else weight, dp, after)


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
