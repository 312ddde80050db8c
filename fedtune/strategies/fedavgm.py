"""FedAvgM (Hsu et al. 2019): FedAvg's mean as the server's pseudo-gradient, with momentum.

``m_t = momentum · m_{t-1} + Δ_t`` and ``x_{t+1} = x_t + server_lr · m_t`` (``m_0 = 0``). The
defaults (0.9, 0.1) give FedAvg's step size once the momentum has built up (``server_lr /
(1 - momentum) = 1``), smoothed across rounds.
"""

from __future__ import annotations

from pydantic import Field

from fedtune.strategies import register
from fedtune.strategies.base import RoundContext, Strategy, StrategyOptions, Tensors, WeightedDelta


class FedAvgMOptions(StrategyOptions):
    server_lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


@register
class FedAvgM(Strategy):
    name = "fedavgm"
    summary = "FedAvg with server momentum (server_lr, momentum)"
    kind = "server"
    options = FedAvgMOptions
    reference = "Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"

    def server_step(self, mean: Tensors, state: Tensors, ctx: RoundContext,
                    updates: list[WeightedDelta]) -> tuple[Tensors, Tensors]:
        import torch

        opts = self.opts
        assert isinstance(opts, FedAvgMOptions)
        new_state: Tensors = {}
        step: Tensors = {}
        for name, d in mean.items():
            m = state.get(f"m/{name}", torch.zeros_like(d, dtype=torch.float64))
            m = opts.momentum * m + d.to(torch.float64)
            new_state[f"m/{name}"] = m
            step[name] = (opts.server_lr * m).to(torch.float32)
        return step, new_state
