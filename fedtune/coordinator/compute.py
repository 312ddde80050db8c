"""Where a job's tensor work runs: combining a round's updates into the next global adapter, and
evaluating it.

In-process, it runs in the engine's thread; on Ray (:mod:`fedtune.cluster.jobs`) in the base's
compute actor, so engine actors move adapters only as safetensors bytes and never import torch.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.state import Job
from fedtune.methods import method_options
from fedtune.methods.base import METHOD_METRICS_METADATA, AfterAggregate
from fedtune.methods.lora import PRODUCT_ERROR_METADATA, LoraAggregation
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.privacy import DpNoise, add_gaussian_noise, clip_update
from fedtune.secagg.adapter_vector import unflatten_sum
from fedtune.strategies import Strategy, WeightedDelta, get_strategy
from fedtune.strategies.base import RoundContext, StrategyRun
from fedtune.strategies.scaffold import CONTROL_PREFIX
from fedtune.tensor_blobs import Schema

if TYPE_CHECKING:
    from fedtune.coordinator.evaluator import Evaluator


def combine_updates(deltas: list[dict[str, torch.Tensor]], weights: list[int], strategy: str | Strategy,
                    clip_norm: float | None, controls: list[dict[str, torch.Tensor] | None] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Combines decoded deltas (of the job's shapes).

    Without ``clip_norm``: the strategy's aggregate (FedAvg: the example-weighted mean).
    With it (central DP): the plain sum of the updates clipped to ``clip_norm``, to be noised.
    """
    if clip_norm is not None:
        clipped = [clip_update(d, clip_norm)[0] for d in deltas]
        return {k: torch.stack([c[k] for c in clipped]).sum(0) for k in deltas[0]}
    unit = get_strategy(strategy) if isinstance(strategy, str) else strategy
    ctrl = controls or [None] * len(deltas)
    return unit.combine([WeightedDelta(d, n, c) for d, n, c in zip(deltas, weights, ctrl, strict=True)])


def split_controls(wire: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """An update's adapter tensors and, for SCAFFOLD, its control-variate change (None without one)."""
    control = {k[len(CONTROL_PREFIX):]: v.float() for k, v in wire.items() if k.startswith(CONTROL_PREFIX)}
    rest = {k: v for k, v in wire.items() if not k.startswith(CONTROL_PREFIX)}
    return rest, control or None


def decode_updates(plains: list[bytes], codec: str, schema: Schema, lora: LoraAggregation | None = None,
                   ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor] | None]]:
    """Each opened update as an fp32 delta, as its client sent it (the job's shapes, or for LoRA
    its client's rank and its mode's tensors; ffa: no A), and its control variate, if any."""
    decoder = get_codec(codec)
    deltas, controls = [], []
    for i, p in enumerate(plains):
        wire, control = split_controls(bytes_to_tensors(p))
        deltas.append(decoder.decode(wire, lora.update_schema(schema, i) if lora else schema))
        controls.append(control)
    return deltas, controls


def _apply(current: dict[str, torch.Tensor], mean: dict[str, torch.Tensor], run: StrategyRun,
           updates: list[WeightedDelta], after: AfterAggregate | None,
           ) -> tuple[dict[str, torch.Tensor], dict[str, str], bytes | None]:
    """``current`` plus the strategy's server step on the round's ``mean`` delta, then the method's
    own step; the blob metadata that carries its metrics; the strategy's new state.

    A tensor that ``mean`` lacks (LoRA's frozen A under ffa) is carried over unchanged.
    """
    state = bytes_to_tensors(run.state) if run.state else {}
    step, new_state = run.strategy().server_step(mean, state, RoundContext(run.round, run.enrolled), updates)
    new = {k: (current[k] + step[k]).contiguous() if k in step else current[k] for k in current}
    metadata = {"format": "pt"}
    if after is not None:
        # The method's own step on the aggregate (AdaLoRA: prune to the round's rank budget); its
        # metrics ride in the blob's metadata to the engine, which never imports torch.
        method, opts = method_options(after.peft)
        new, metrics = method.after_aggregate(opts, new, after.budget)
        metadata[METHOD_METRICS_METADATA] = json.dumps(metrics)
    state_blob = tensors_to_bytes({k: v.contiguous() for k, v in new_state.items()}) if new_state else None
    return new, metadata, state_blob


def _noised_mean(total: dict[str, torch.Tensor], denominator: float, dp: DpNoise | None) -> dict[str, torch.Tensor]:
    if dp is not None:
        total = add_gaussian_noise(total, dp.noise_multiplier, dp.clip_norm)
    return {k: v / denominator for k, v in total.items()}


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


def product_error(states: list[dict[str, torch.Tensor]], weights: list[int], new: dict[str, torch.Tensor], *,
                  via: str = "auto") -> float:
    """‖mean(B·A) − B'·A'‖ / ‖mean(B·A)‖ over all LoRA modules of ``new`` (0 for ffa, which is
    exact; what factors and fedsa give up).

    Per module the difference is one low-rank product B·A with B = [w_1 B_1 | … | w_n B_n | −B'] and
    A = [A_1; …; A_n; A']. With few clients it is computed from the factors alone, never forming an
    (out, in) product: ‖B·A‖² = Σ (BᵀB) ⊙ (AAᵀ), two Gram matrices of side Σ ranks. For 4 clients at
    rank 8 on 768×768 modules that is ~40x less arithmetic than the products (and no 4.7 MB
    temporaries per module), which kept this diagnostic on the round's critical path at ~0.7 s on a
    100 M base. The Grams grow with the square of the clients, though: where Σ ranks · (out + in)
    exceeds out · in (e.g. 1000 clients at rank 8 on 128×128 modules: seconds a round), the product
    B·A is formed once instead, in one matrix product. ``via``: "gram" or "product" forces one way
    (tests).
    """
    from fedtune.methods.lora_aggregation import lora_pairs

    total = math.fsum(float(w) for w in weights)
    if total <= 0:
        return 0.0
    factors = [float(w) / total for w in weights] + [-1.0]
    client_pairs = [lora_pairs(state) for state in states]
    num = den = 0.0
    for module, (a_new, b_new) in lora_pairs(new).items():
        bs, as_ = [], []
        for state, pairs, f in zip([*states, new], [*client_pairs, {module: (a_new, b_new)}], factors, strict=True):
            a_key, b_key = pairs[module]
            as_.append(state[a_key].double())
            bs.append(state[b_key].double() * f)
        b_all, a_all = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        clients = sum(int(a.shape[0]) for a in as_[:-1])  # the clients' block: mean(B·A) alone
        (out_f, side), in_f = b_all.shape, a_all.shape[1]
        if via == "product" or (via == "auto" and side * (out_f + in_f) > out_f * in_f):
            num += float((b_all @ a_all).pow(2).sum())  # B' enters with factor -1: the difference
            den += float((b_all[:, :clients] @ a_all[:clients]).pow(2).sum())
            continue
        terms = (b_all.T @ b_all) * (a_all @ a_all.T)
        num += float(terms.sum())
        den += float(terms[:clients, :clients].sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def next_global(global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                strategy: StrategyRun, dp: DpNoise | None, lora: LoraAggregation | None = None,
                after: AfterAggregate | None = None) -> tuple[bytes, bytes | None]:
    """A round's new global adapter from the opened updates, as safetensors bytes, and the
    strategy's state after it (None for a strategy that keeps none).

    Without ``dp``: ``global_in`` plus the strategy's server step on its aggregate (FedAvg: the
    example-weighted mean of the deltas, added as it is). With it: the step on the noised sum of
    the updates clipped to its norm, over its planned cohort size. In async mode every delta is
    first scaled by its staleness weight (:attr:`StrategyRun.staleness`).

    ``lora``: a LoRA job's mode and its clients' ranks. exact: the weighted mean of the clients'
    products B·A, re-factored to the job's rank by SVD (other tensors: their weighted mean). Other
    modes: each delta zero-padded to the job's rank (a lower-rank client leaves the components above
    its rank unchanged; HetLoRA's padding), then as above. Without DP the round's
    ``lora_product_error`` (exact: the SVD's truncation error) travels in the blob's metadata.
    """
    deltas, controls = decode_updates(plains, codec, schema, lora)
    factors = strategy.factors(len(deltas))
    if any(f != 1.0 for f in factors):
        deltas = [{k: v * f for k, v in d.items()} for d, f in zip(deltas, factors, strict=True)]
    current = bytes_to_tensors(global_in)
    unit = strategy.strategy()
    states = None
    if lora is not None:
        from fedtune.methods.lora_aggregation import exact_aggregate, pad_rank

        states = client_states(current, deltas, lora)
        if lora.mode == "exact":
            new, error = exact_aggregate(states, [float(w) for w in weights], lora.rank)
            return _blob(new, {"format": "pt", PRODUCT_ERROR_METADATA: repr(float(error))}), None
        deltas = [pad_rank(d, lora.rank) for d in deltas]
    updates = [WeightedDelta(d, n, c) for d, n, c in zip(deltas, weights, controls, strict=True)]
    if dp is not None:
        mean = _noised_mean(combine_updates(deltas, weights, unit, dp.clip_norm), dp.planned, dp)
    else:
        mean = unit.combine(updates)
    new, metadata, state_blob = _apply(current, mean, strategy, updates, after)
    if dp is None and states is not None:
        metadata[PRODUCT_ERROR_METADATA] = repr(product_error(states, weights, new))
    return _blob(new, metadata), state_blob


def next_global_from_sum(global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                         dp: DpNoise | None, after: AfterAggregate | None = None,
                         strategy: StrategyRun | None = None) -> tuple[bytes, bytes | None]:
    """A secure-aggregation round's new global adapter from its unmasked, decoded sum, and the
    strategy's state after it.

    ``total`` holds the survivors' summed weighted deltas and, last, their summed weights (see
    :mod:`fedtune.secagg.adapter_vector`); the mean divides by that sum, or under DP by the
    planned cohort size after noising; the strategy's server step (FedAvg: none) applies to it.
    """
    sums, weight = unflatten_sum(total, schema, clip)
    mean = _noised_mean(sums, dp.planned if dp else weight, dp)
    new, metadata, state_blob = _apply(bytes_to_tensors(global_in), mean, strategy or StrategyRun(), [], after)
    return _blob(new, metadata), state_blob


class Compute(Protocol):
    """Runs a job's aggregation and evaluation."""

    def aggregate(self, global_in: bytes, plains: list[bytes], weights: list[int], codec: str, schema: Schema,
                  strategy: StrategyRun, dp: DpNoise | None, lora: LoraAggregation | None = None,
                  after: AfterAggregate | None = None) -> tuple[bytes, bytes | None]:
        """See :func:`next_global`."""
        ...

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None, after: AfterAggregate | None = None,
                      strategy: StrategyRun | None = None) -> tuple[bytes, bytes | None]:
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
                  strategy: StrategyRun, dp: DpNoise | None, lora: LoraAggregation | None = None,
                  after: AfterAggregate | None = None) -> tuple[bytes, bytes | None]:
        return next_global(global_in, plains, weights, codec, schema, strategy, dp, lora, after)

    def aggregate_sum(self, global_in: bytes, total: np.ndarray, schema: Schema, clip: float,
                      dp: DpNoise | None, after: AfterAggregate | None = None,
                      strategy: StrategyRun | None = None) -> tuple[bytes, bytes | None]:
        return next_global_from_sum(global_in, total, schema, clip, dp, after, strategy)

    def evaluate(self, job: Job, adapter: bytes | None) -> dict[str, float]:
        return self.evaluator.evaluate(job, None if adapter is None else bytes_to_tensors(adapter))

    def release(self, job_id: str) -> None:
        self.evaluator.release(job_id)
