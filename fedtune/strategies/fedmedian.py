"""FedMedian (Yin et al. 2018): the coordinate-wise median of the deltas, unweighted.

With an even number of updates, the mean of the two middle values (as NumPy's median). A minority
of arbitrary updates cannot move any coordinate past the honest clients' values.
"""

from __future__ import annotations

from fedtune.strategies import register
from fedtune.strategies.base import Strategy, Tensors, WeightedDelta, check_updates, stacked


def coordinate_median(values: object) -> object:
    """The median along dim 0 of a float64 stack (mean of the middle two for an even count)."""
    import torch

    assert isinstance(values, torch.Tensor)
    ordered = values.sort(dim=0).values
    n = ordered.size(0)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@register
class FedMedian(Strategy):
    name = "fedmedian"
    summary = "coordinate-wise median of the deltas (Byzantine-robust)"
    kind = "robust"
    robust = True
    reference = "Yin et al. 2018, Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"

    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        import torch

        check_updates(updates)
        out: Tensors = {}
        for name in updates[0].delta:
            median = coordinate_median(stacked(updates, name))
            assert isinstance(median, torch.Tensor)
            out[name] = median.to(torch.float32)
        return out
