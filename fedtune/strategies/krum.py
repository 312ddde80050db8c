"""Krum (Blanchard et al. 2017): the one update closest to its neighbours.

Each update's score is the sum of its squared L2 distances to its ``n - f - 2`` nearest other
updates (``f``: ``byzantine``, the attackers tolerated); the lowest score wins (ties: the earlier
arrival). Needs ``n > 2f + 2``. The winner is applied as it is.
"""

from __future__ import annotations

from pydantic import Field

from fedtune.errors import InvalidInput
from fedtune.strategies import register
from fedtune.strategies.base import Strategy, StrategyOptions, Tensors, WeightedDelta, check_updates, flat


class KrumOptions(StrategyOptions):
    byzantine: int = Field(1, ge=0)


def krum_scores(updates: list[WeightedDelta], byzantine: int, strict: bool = True) -> list[float]:
    """Each update's Krum score (lower: more central).

    ``strict``: refuse a set of ``n <= 2f + 2``; otherwise (Bulyan's shrinking pool) score over
    ``max(1, n - f - 2)`` neighbours.
    """
    import torch

    n = len(updates)
    if strict and n <= 2 * byzantine + 2:
        raise InvalidInput(f"Krum with byzantine {byzantine} needs more than {2 * byzantine + 2} updates "
                           f"(n > 2f + 2); the round has {n}")
    vectors = torch.stack([flat(u.delta) for u in updates])
    dist = torch.cdist(vectors, vectors).pow(2)
    near = max(1, n - byzantine - 2)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1:]])
        scores.append(float(others.sort().values[:near].sum()))
    return scores


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, ties to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]


@register
class Krum(Strategy):
    name = "krum"
    summary = "the update closest to its n-f-2 nearest others (byzantine: f)"
    kind = "robust"
    robust = True
    options = KrumOptions
    reference = "Blanchard et al. 2017, Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"

    def min_updates(self) -> int:
        assert isinstance(self.opts, KrumOptions)
        return 2 * self.opts.byzantine + 3

    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        check_updates(updates)
        assert isinstance(self.opts, KrumOptions)
        best = lowest(krum_scores(updates, self.opts.byzantine), 1)[0]
        return dict(updates[best].delta)
