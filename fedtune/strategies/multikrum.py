"""Multi-Krum (Blanchard et al. 2017): the ``keep`` updates of lowest Krum score, averaged with
their example weights (``keep`` null: ``n - f``)."""

from __future__ import annotations

from pydantic import Field

from fedtune.errors import InvalidInput
from fedtune.strategies import register
from fedtune.strategies.base import (
    Strategy,
    StrategyOptions,
    Tensors,
    WeightedDelta,
    check_updates,
    weighted_mean,
)
from fedtune.strategies.krum import krum_scores, lowest


class MultiKrumOptions(StrategyOptions):
    byzantine: int = Field(1, ge=0)
    keep: int | None = Field(None, ge=1)


@register
class MultiKrum(Strategy):
    name = "multikrum"
    summary = "mean of the keep updates with the lowest Krum scores (byzantine, keep)"
    kind = "robust"
    robust = True
    options = MultiKrumOptions
    reference = "Blanchard et al. 2017, Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"

    def min_updates(self) -> int:
        assert isinstance(self.opts, MultiKrumOptions)
        return max(2 * self.opts.byzantine + 3, self.opts.keep or 0)

    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        check_updates(updates)
        o = self.opts
        assert isinstance(o, MultiKrumOptions)
        keep = o.keep if o.keep is not None else len(updates) - o.byzantine
        if keep > len(updates):
            raise InvalidInput(f"multikrum keep {keep} is more than the round's {len(updates)} updates")
        chosen = lowest(krum_scores(updates, o.byzantine), keep)
        return weighted_mean([updates[i].delta for i in chosen], [float(updates[i].num_examples) for i in chosen])
