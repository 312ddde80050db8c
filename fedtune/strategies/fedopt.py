"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The round's mean delta ``Δ_t`` is the pseudo-gradient; with ``m_{-1} = 0`` and ``v_{-1} = τ²``:

- ``m_t = β1 · m_{t-1} + (1 - β1) · Δ_t``
- FedAdagrad: ``v_t = v_{t-1} + Δ_t²``
- FedYogi: ``v_t = v_{t-1} - (1 - β2) · Δ_t² · sign(v_{t-1} - Δ_t²)``
- FedAdam: ``v_t = β2 · v_{t-1} + (1 - β2) · Δ_t²``
- ``x_{t+1} = x_t + server_lr · m_t / (√v_t + τ)``

No bias correction, as in the paper. The moments are kept in float64 and stored with every
published round, so a restarted coordinator continues with the same ones.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from fedtune.strategies.base import RoundContext, Strategy, StrategyOptions, Tensors, WeightedDelta


class FedOptOptions(StrategyOptions):
    """FedAdagrad's options (its second moment has no decay)."""

    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FedMomentsOptions(FedOptOptions):
    """FedYogi's and FedAdam's options."""

    beta2: float = Field(0.99, gt=0, lt=1)


class FedOpt(Strategy):
    """The shared step of FedAdagrad, FedYogi and FedAdam; subclasses give the second moment."""

    kind = "server"
    options: ClassVar[type[StrategyOptions]] = FedOptOptions
    reference = "Reddi et al. 2021, Adaptive Federated Optimization"
    second_moment: ClassVar[str]

    def server_step(self, mean: Tensors, state: Tensors, ctx: RoundContext,
                    updates: list[WeightedDelta]) -> tuple[Tensors, Tensors]:
        import torch

        o = self.opts
        assert isinstance(o, FedOptOptions)
        new_state: Tensors = {}
        step: Tensors = {}
        for name, d32 in mean.items():
            d = d32.to(torch.float64)
            m = state.get(f"m/{name}", torch.zeros_like(d))
            v = state.get(f"v/{name}", torch.full_like(d, o.tau**2))
            m = o.beta1 * m + (1 - o.beta1) * d
            sq = d * d
            if self.second_moment == "adagrad":
                v = v + sq
            elif self.second_moment == "yogi":
                assert isinstance(o, FedMomentsOptions)
                v = v - (1 - o.beta2) * sq * torch.sign(v - sq)
            else:
                assert isinstance(o, FedMomentsOptions)
                v = o.beta2 * v + (1 - o.beta2) * sq
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
            step[name] = (o.server_lr * m / (v.sqrt() + o.tau)).to(torch.float32)
        return step, new_state
