"""Bulyan (El Mhamdi et al. 2018): Krum to select, a trimmed mean around the median to combine.

With ``f`` = ``byzantine`` and ``n >= 4f + 3`` updates: pick ``θ = n - 2f`` of them by applying Krum
again and again to what is left (each winner leaves the pool); then, per coordinate, average the
``β = θ - 2f`` selected values closest to their median.
"""

from __future__ import annotations

from pydantic import Field

from fedtune.errors import InvalidInput
from fedtune.strategies import register
from fedtune.strategies.base import Strategy, StrategyOptions, Tensors, WeightedDelta, check_updates, stacked
from fedtune.strategies.fedmedian import coordinate_median
from fedtune.strategies.krum import krum_scores, lowest


class BulyanOptions(StrategyOptions):
    byzantine: int = Field(1, ge=0)


@register
class Bulyan(Strategy):
    name = "bulyan"
    summary = "iterated Krum, then a per-coordinate mean around the median (byzantine: f, n >= 4f+3)"
    kind = "robust"
    robust = True
    options = BulyanOptions
    reference = "El Mhamdi et al. 2018, The Hidden Vulnerability of Distributed Learning in Byzantium"

    def min_updates(self) -> int:
        assert isinstance(self.opts, BulyanOptions)
        return 4 * self.opts.byzantine + 3

    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        import torch

        check_updates(updates)
        assert isinstance(self.opts, BulyanOptions)
        f = self.opts.byzantine
        n = len(updates)
        if n < 4 * f + 3:
            raise InvalidInput(f"bulyan with byzantine {f} needs at least {4 * f + 3} updates (n >= 4f + 3); "
                               f"the round has {n}")
        pool = list(range(n))
        selected: list[int] = []
        while len(selected) < n - 2 * f:
            # Krum on what is left, over max(1, |pool| - f - 2) neighbours as the pool shrinks.
            pick = pool[lowest(krum_scores([updates[i] for i in pool], f, strict=False), 1)[0]] if len(pool) > 1 \
                else pool[0]
            selected.append(pick)
            pool.remove(pick)
        chosen = [updates[i] for i in sorted(selected)]
        beta = len(chosen) - 2 * f
        out: Tensors = {}
        for name in updates[0].delta:
            values = stacked(chosen, name)
            median = coordinate_median(values)
            assert isinstance(median, torch.Tensor)
            nearest = (values - median).abs().argsort(dim=0, stable=True)[:beta]
            out[name] = values.gather(0, nearest).mean(dim=0).to(torch.float32)
        return out
