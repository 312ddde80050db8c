"""FedAdagrad (Reddi et al. 2021): the server's adaptive step on the round's mean delta (see :mod:`fedtune.strategies.fedopt`)."""

from __future__ import annotations

from fedtune.strategies import register
from fedtune.strategies.fedopt import FedOpt


@register
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    summary = "server-side Adagrad on the mean delta (server_lr, beta1, tau)"
    second_moment = "adagrad"
