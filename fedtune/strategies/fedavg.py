"""FedAvg (McMahan et al. 2017): the example-weighted mean of the deltas, added as it is."""

from __future__ import annotations

from fedtune.strategies import register
from fedtune.strategies.base import Strategy


@register
class FedAvg(Strategy):
    name = "fedavg"
    summary = "mean of the deltas weighted by example counts"
    reference = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data"
