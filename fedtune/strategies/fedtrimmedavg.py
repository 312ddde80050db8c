"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the ``beta`` fraction of largest and of
smallest values, and average the rest (unweighted; ``int(beta · n)`` values cut at each end, as
SciPy's ``trim_mean``)."""

from __future__ import annotations

from pydantic import Field

from fedtune.strategies import register
from fedtune.strategies.base import Strategy, StrategyOptions, Tensors, WeightedDelta, check_updates, stacked


class TrimmedOptions(StrategyOptions):
    beta: float = Field(0.2, ge=0, lt=0.5)


@register
class FedTrimmedAvg(Strategy):
    name = "fedtrimmedavg"
    summary = "coordinate-wise mean after trimming beta of each end (Byzantine-robust)"
    kind = "robust"
    robust = True
    options = TrimmedOptions
    reference = "Yin et al. 2018, Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"

    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        import torch

        check_updates(updates)
        assert isinstance(self.opts, TrimmedOptions)
        n = len(updates)
        cut = int(self.opts.beta * n)
        out: Tensors = {}
        for name in updates[0].delta:
            ordered = stacked(updates, name).sort(dim=0).values
            out[name] = ordered[cut:n - cut].mean(dim=0).to(torch.float32)
        return out
