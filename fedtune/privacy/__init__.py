"""Client-level differential privacy for federated rounds (DP-FedAvg with an RDP accountant).

`mechanism` clips each client's update and noises the cohort's sum; `accountant` tracks the privacy
spent across rounds as Renyi DP and converts it to an (epsilon, delta) guarantee.
"""

from fedtune.privacy.accountant import DEFAULT_ORDERS, RdpAccountant, compute_rdp, rdp_to_epsilon
from fedtune.privacy.mechanism import add_gaussian_noise, clip_update, global_l2_norm

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "add_gaussian_noise",
    "clip_update",
    "compute_rdp",
    "global_l2_norm",
    "rdp_to_epsilon",
]
