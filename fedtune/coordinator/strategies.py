"""Aggregation strategies: how a round's accepted deltas become one delta.

A strategy is a small registered unit with one method; FedAvg is the first, more plug in by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fedtune.errors import InvalidInput


@dataclass(frozen=True)
class WeightedDelta:
    """One client's decoded fp32 delta and the number of examples it trained on."""

    delta: dict[str, torch.Tensor]
    num_examples: int


class Strategy(Protocol):
    """Combines a round's deltas into the delta applied to the global adapter."""

    name: str

    def aggregate(self, updates: list[WeightedDelta]) -> dict[str, torch.Tensor]:
        """The aggregated delta (same names and shapes as each input)."""
        ...


class FedAvg:
    """Mean of the deltas weighted by example counts (McMahan et al. 2017)."""

    name = "fedavg"

    def aggregate(self, updates: list[WeightedDelta]) -> dict[str, torch.Tensor]:
        """Weighted mean, accumulated in float64 so the order of arrival does not matter."""
        if not updates:
            raise InvalidInput("cannot aggregate an empty round")
        total = sum(u.num_examples for u in updates)
        if total <= 0:
            raise InvalidInput("cannot aggregate updates that trained on no examples")
        out: dict[str, torch.Tensor] = {}
        for name in updates[0].delta:
            acc = torch.zeros_like(updates[0].delta[name], dtype=torch.float64)
            for u in updates:
                acc += u.delta[name].to(torch.float64) * (u.num_examples / total)
            out[name] = acc.to(torch.float32)
        return out


STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg}


def get_strategy(name: str) -> Strategy:
    """A registered strategy by name."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise InvalidInput(f"unknown aggregation strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
