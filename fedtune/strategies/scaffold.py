"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each client's drift.

Client (:mod:`fedtune.strategies.local`): after every optimizer step, ``y ← y - lr_t · (c - c_i)``
(``c``: the server's variate from the task, ``c_i``: the client's own, kept in its state dir);
after the round, option II: ``c_i⁺ = c_i - c + (x - y) / Σ_t lr_t``, and the change ``c_i⁺ - c_i``
travels in fp32 beside the update (its bytes are counted with it). Server: ``x ← x + server_lr ·
mean(Δy)`` (example-weighted, as FedAvg) and ``c ← c + (|S| / N) · mean(Δc_i)`` over the round's
``|S|`` contributors of the ``N`` enrolled clients. ``c`` is this strategy's durable state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from fedtune.errors import InvalidInput
from fedtune.strategies import register
from fedtune.strategies.base import RoundContext, Strategy, StrategyOptions, Tensors, WeightedDelta

if TYPE_CHECKING:
    from fedtune.spec import JobSpec

# How a control variate's tensors are named in the update blob and in the strategy's state.
CONTROL_PREFIX = "control/"
STATE_PREFIX = "c/"


class ScaffoldOptions(StrategyOptions):
    server_lr: float = Field(1.0, gt=0)


@register
class Scaffold(Strategy):
    name = "scaffold"
    summary = "control variates against client drift (server_lr); the variate travels with the update"
    kind = "client"
    options = ScaffoldOptions
    client_feature = "scaffold"
    reference = "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"

    def refusal(self, spec: JobSpec) -> str | None:
        if spec.secure_aggregation is not None:
            return ("each client's control variate travels in the clear beside its update, which secure "
                    "aggregation would hide; use fedprox or fedavg with it")
        if spec.privacy is not None:
            return "the control variates are neither clipped nor noised, so the DP guarantee would not hold"
        if spec.aggregation.mode == "async":
            return "control variates are defined per synchronous round"
        if spec.aggregation.lora == "exact":
            return "aggregation.lora exact re-factors A and B by SVD every round, which the variates cannot follow"
        return super().refusal(spec)

    def client_options(self) -> dict[str, Any]:
        return {"name": self.name}

    def server_step(self, mean: Tensors, state: Tensors, ctx: RoundContext,
                    updates: list[WeightedDelta]) -> tuple[Tensors, Tensors]:
        import torch

        assert isinstance(self.opts, ScaffoldOptions)
        for u in updates:
            if u.control is None:
                raise InvalidInput("a SCAFFOLD update has no control variate")
        share = len(updates) / max(ctx.enrolled, len(updates))
        new_state: Tensors = {}
        for name in mean:
            c = state.get(STATE_PREFIX + name, torch.zeros_like(mean[name], dtype=torch.float64))
            change = torch.stack([u.control[name].to(torch.float64) for u in updates if u.control]).mean(0)
            new_state[STATE_PREFIX + name] = c + share * change
        return {k: (self.opts.server_lr * v).to(torch.float32) for k, v in mean.items()}, new_state
