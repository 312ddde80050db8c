"""Client-level differential privacy for federated rounds (DP-FedAvg with an RDP accountant).

`mechanism` clips each client's update and noises the cohort's sum; `accountant` tracks the privacy
spent across rounds as Renyi DP and converts it to an (epsilon, delta) guarantee. The mechanism
(torch) is imported on first use, so the accountant alone costs a job engine no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.privacy.accountant import DEFAULT_ORDERS, RdpAccountant, compute_rdp, rdp_to_epsilon

if TYPE_CHECKING:
    from fedtune.privacy.mechanism import add_gaussian_noise, clip_update, global_l2_norm

__all__ = [
    "DEFAULT_ORDERS",
    "DpNoise",
    "RdpAccountant",
    "add_gaussian_noise",
    "clip_update",
    "compute_rdp",
    "global_l2_norm",
    "rdp_to_epsilon",
]
@dataclass(frozen=True)
class DpNoise:
    """Central DP for a round: Gaussian noise on the sum of clipped updates, a fixed denominator.

    Attributes:
        noise_multiplier: Noise standard deviation in units of ``clip_norm``.
        clip_norm: Each update's L2 bound.
        planned: The planned cohort size, the mean's denominator (so one client moves the mean by
            at most ``clip_norm / planned``).
    """

    noise_multiplier: float
    clip_norm: float
    planned: int


_MECHANISM = {"add_gaussian_noise", "clip_update", "global_l2_norm"}


def __getattr__(name: str) -> Any:
    if name in _MECHANISM:
        from fedtune.privacy import mechanism

        return getattr(mechanism, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
