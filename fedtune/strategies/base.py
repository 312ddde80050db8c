"""What an aggregation strategy is to fedtune: a small unit, registered by name.

A round's accepted updates reach a strategy as fp32 deltas against the global adapter the round
started from. The strategy combines them (:meth:`Strategy.combine`: FedAvg's weighted mean, a
median, Krum's pick), then takes the server's step (:meth:`Strategy.server_step`: plain addition,
or an optimizer with moments). What it keeps between rounds (momentum, moments, SCAFFOLD's server
control variate) is a dict of tensors the engine stores durably with the round that wrote it, so a
coordinator that restarts mid-job aggregates the next round from exactly the state an uninterrupted
run would have.

Options are pydantic models, validated at the spec's boundary and torch-free; the math imports
torch inside the methods, so a job engine that only reads specs never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from fedtune.spec import JobSpec

Tensors = dict[str, "torch.Tensor"]

# What a client agent tells the coordinator it can run at Join; a job whose strategy or evaluation
# needs one of them refuses a client that lacks it (an older agent would silently run plain FedAvg).
CLIENT_FEATURES = ("fedprox", "scaffold", "federated-eval", "async")


class StrategyOptions(BaseModel):
    """Base of every strategy's options: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(StrategyOptions):
    """A strategy without options."""


@dataclass(frozen=True)
class WeightedDelta:
    """One client's decoded fp32 delta and the number of examples it trained on.

    Attributes:
        control: SCAFFOLD only: the change of the client's control variate (same names and shapes).
    """

    delta: Tensors
    num_examples: int
    control: Tensors | None = None


@dataclass(frozen=True)
class RoundContext:
    """What a strategy may know about the round it aggregates.

    Attributes:
        round: The round (1-based).
        enrolled: Clients enrolled in the job (SCAFFOLD's N).
    """

    round: int
    enrolled: int


@dataclass(frozen=True)
class StrategyRun:
    """What a round's aggregation needs of the job's strategy (picklable, for Ray's compute actor).

    Attributes:
        name: ``aggregation.strategy``.
        options: ``aggregation.options``.
        state: What the strategy kept after the previous round (safetensors bytes; None before the first).
        round: The round being aggregated.
        enrolled: Clients enrolled in the job.
        staleness: Async mode: each update's age in versions (empty: all 0).
        staleness_exponent: Async mode: an update ``s`` versions old weighs ``(1 + s) ** -exponent``.
    """

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)
    state: bytes | None = None
    round: int = 1
    enrolled: int = 1
    staleness: tuple[int, ...] = ()
    staleness_exponent: float = 0.5

    def strategy(self) -> Strategy:
        """The strategy, with its options."""
        from fedtune.strategies import get_strategy

        return get_strategy(self.name, self.options)

    def factors(self, n: int) -> list[float]:
        """Each update's staleness weight (FedBuff's polynomial ``(1 + s) ** -exponent``; 1 in
        synchronous rounds)."""
        return [(1.0 + s) ** -self.staleness_exponent for s in self.staleness] if self.staleness else [1.0] * n


class Strategy:
    """One aggregation strategy. Subclasses set the class attributes and override what differs.

    Attributes:
        name: The value of ``aggregation.strategy``.
        summary: One line for ``fedtune job init --list-strategies``.
        kind: average, server (an optimizer on the server), robust (Byzantine-robust) or client
            (an algorithm in the client's training loop).
        options: The pydantic model of ``aggregation.options``.
        robust: It needs each client's update in the clear (not only their sum), so it cannot run
            under secure aggregation, and its output is not the clipped sum the DP accountant
            assumes.
        client_feature: What a client's agent must run for it (see :data:`CLIENT_FEATURES`).
        reference: The paper, for the docs.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str] = "average"
    options: ClassVar[type[StrategyOptions]] = NoOptions
    robust: ClassVar[bool] = False
    client_feature: ClassVar[str | None] = None
    reference: ClassVar[str] = ""

    def __init__(self, opts: StrategyOptions) -> None:
        self.opts = opts

    @classmethod
    def from_options(cls, raw: dict[str, Any]) -> Strategy:
        """The strategy with ``aggregation.options`` validated.

        Raises:
            InvalidInput: ``aggregation.options.<key>: <why>`` for the first bad or unknown key.
        """
        try:
            return cls(cls.options.model_validate(raw))
        except ValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            why = "unknown option" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            known = ", ".join(cls.options.model_fields) or "none"
            raise InvalidInput(f"aggregation.options.{key}: {why} for strategy {cls.name} (its options: {known})") \
                from None

    # ------------------------------------------------------------------ checks at job create
    def min_updates(self) -> int:
        """The fewest updates a round needs for this strategy to mean anything."""
        return 1

    def refusal(self, spec: JobSpec) -> str | None:
        """Why this strategy cannot run the job as specified (None: it can).

        The shared rules are here; a subclass adds its own and calls this one.
        """
        if self.robust:
            if spec.secure_aggregation is not None:
                return (f"{self.name} compares each client's update with the others, and secure aggregation "
                        "shows the coordinator only their sum; use fedavg or a server optimizer (fedavgm, "
                        "fedadam, fedyogi, fedadagrad) with it")
            if spec.privacy is not None:
                return (f"the DP accountant assumes the Gaussian mechanism on the sum of updates clipped to "
                        f"clip_norm; {self.name}'s output is not that sum, so no epsilon would hold; use fedavg "
                        "or a server optimizer with privacy")
            if spec.aggregation.mode == "async":
                return (f"{self.name} compares updates made on one global adapter; asynchronous updates start "
                        "from different versions of it")
            if spec.aggregation.lora == "exact":
                return f"aggregation.lora exact averages the clients' products B·A, which {self.name} does not"
        if spec.aggregation.lora == "exact" and self.kind == "server":
            return (f"aggregation.lora exact re-factors the mean product by SVD every round, so A and B change "
                    f"basis and {self.name}'s per-coordinate moments would mix unrelated directions; use "
                    "factors or ffa")
        need = self.min_updates()
        if spec.aggregation.mode == "sync" and spec.min_clients < need:
            return (f"needs at least {need} updates per round and a round may close with min_clients "
                    f"({spec.min_clients}); raise min_clients to {need}")
        return None

    # ------------------------------------------------------------------ what clients run
    def client_options(self) -> dict[str, Any] | None:
        """What rides in each task for the client's training loop (None: plain local training)."""
        return None

    # ------------------------------------------------------------------ aggregation
    def combine(self, updates: list[WeightedDelta]) -> Tensors:
        """The round's aggregate delta (same names and shapes as each input). Default: FedAvg's
        example-weighted mean, accumulated in float64 so the order of arrival does not matter."""
        check_updates(updates)
        return weighted_mean([u.delta for u in updates], [float(u.num_examples) for u in updates])

    def server_step(self, mean: Tensors, state: Tensors, ctx: RoundContext,
                    updates: list[WeightedDelta]) -> tuple[Tensors, Tensors]:
        """What is added to the global adapter, and the state kept for the next round.

        Args:
            mean: The round's aggregate (:meth:`combine`, or under DP the noised clipped mean).
            state: What this strategy kept from the previous round (empty before the first).
            ctx: The round.
            updates: The round's updates (SCAFFOLD reads their control variates).
        """
        return mean, state


def check_updates(updates: list[WeightedDelta]) -> None:
    """The shared refusals: an empty round, or one with no examples."""
    if not updates:
        raise InvalidInput("cannot aggregate an empty round")
    if sum(u.num_examples for u in updates) <= 0:
        raise InvalidInput("cannot aggregate updates that trained on no examples")


def weighted_mean(deltas: list[Tensors], weights: list[float]) -> Tensors:
    """Σ w_i·d_i / Σ w_i per tensor, in float64, returned as float32."""
    import torch

    if not deltas:
        raise InvalidInput("cannot aggregate an empty round")
    total = sum(weights)
    if total <= 0:
        raise InvalidInput("cannot aggregate updates that trained on no examples")
    out: Tensors = {}
    for name in deltas[0]:
        acc = torch.zeros_like(deltas[0][name], dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            acc += d[name].to(torch.float64) * (w / total)
        out[name] = acc.to(torch.float32)
    return out


def stacked(updates: list[WeightedDelta], name: str) -> torch.Tensor:
    """One tensor's values across the updates, as a float64 stack (clients first)."""
    import torch

    return torch.stack([u.delta[name].to(torch.float64) for u in updates])


def flat(delta: Tensors) -> torch.Tensor:
    """A delta as one float64 vector, in a fixed (sorted) order of names."""
    import torch

    return torch.cat([delta[k].reshape(-1).to(torch.float64) for k in sorted(delta)])
