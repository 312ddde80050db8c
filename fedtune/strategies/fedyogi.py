"""FedYogi (Reddi et al. 2021): the server's adaptive step on the round's mean delta (see :mod:`fedtune.strategies.fedopt`)."""

from __future__ import annotations

from fedtune.strategies import register
from fedtune.strategies.fedopt import FedMomentsOptions, FedOpt


@register
class FedYogi(FedOpt):
    name = "fedyogi"
    summary = "server-side Yogi on the mean delta (server_lr, beta1, beta2, tau)"
    options = FedMomentsOptions
    second_moment = "yogi"
