"""Aggregation strategies by name: the registry behind a job spec's ``aggregation.strategy``.

Each strategy is one module here that registers a :class:`~fedtune.strategies.base.Strategy`: how a
round's deltas become one (FedAvg's weighted mean, a coordinate-wise median, Krum's pick), what the
server does with it (FedAdam's moments), what it keeps between rounds (durable in the job's state
next to the round that wrote it) and what it asks of clients (FedProx's proximal term, SCAFFOLD's
control variates). The round engine never names a strategy. Importing this package is torch-free
(options and checks only), so job engines on Ray read specs without torch.
"""

from __future__ import annotations

from typing import Any

from fedtune.errors import InvalidInput
from fedtune.strategies.base import (
    CLIENT_FEATURES,
    NoOptions,
    Strategy,
    StrategyOptions,
    WeightedDelta,
)

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: makes a strategy available as ``aggregation.strategy: <cls.name>``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"aggregation strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """A registered strategy by name.

    Raises:
        InvalidInput: naming the unknown strategy and the known ones.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidInput(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def get_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """A strategy with its options validated (unknown or bad keys raise InvalidInput, named)."""
    return strategy_class(name).from_options(options or {})


def strategy_list() -> str:
    """One line per registered strategy, for ``fedtune job init --list-strategies``."""
    width = max(len(n) for n in STRATEGIES)
    order = {"average": 0, "server": 1, "client": 2, "robust": 3}
    rows = sorted(STRATEGIES.values(), key=lambda s: (order.get(s.kind, 9), s.name))
    return "".join(f"{s.name:<{width}}  {s.kind:<7}  {s.summary}\n" for s in rows)


from fedtune.strategies import (
    bulyan,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedmedian,
    fedprox,
    fedtrimmedavg,
    fedyogi,
    krum,
    multikrum,
    scaffold,
)

__all__ = [
    "CLIENT_FEATURES", "STRATEGIES", "NoOptions", "Strategy", "StrategyOptions", "WeightedDelta",
    "bulyan", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox", "fedtrimmedavg", "fedyogi",
    "get_strategy", "krum", "multikrum", "register", "scaffold", "strategy_class", "strategy_list",
]
