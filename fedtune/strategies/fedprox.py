"""FedProx (Li et al. 2020): each client adds ``mu/2 · ‖w - w_global‖²`` to its local loss.

The term is applied in the client's training loop (:mod:`fedtune.strategies.local`): its gradient
``mu · (w - w_global)`` is added to every step's, before clipping; the server averages as FedAvg
does. ``mu`` rides in each task, and a client whose agent does not run it is refused at Join.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedtune.strategies import register
from fedtune.strategies.base import Strategy, StrategyOptions


class FedProxOptions(StrategyOptions):
    mu: float = Field(0.01, ge=0)


@register
class FedProx(Strategy):
    name = "fedprox"
    summary = "FedAvg with a proximal term mu/2·‖w − w_global‖² in each client's loss (mu)"
    kind = "client"
    options = FedProxOptions
    client_feature = "fedprox"
    reference = "Li et al. 2020, Federated Optimization in Heterogeneous Networks"

    def client_options(self) -> dict[str, Any]:
        assert isinstance(self.opts, FedProxOptions)
        return {"name": self.name, "mu": self.opts.mu}
