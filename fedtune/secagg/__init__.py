"""SecAgg+ secure aggregation (Bell et al. 2020): the coordinator learns only the sum of updates.

Pure and network-free: `ClientSession` and `ServerSession` are per-round state machines, and the
messages in `fedtune.secagg.protocol` serialize to bytes for the gRPC layer to relay. Needs the
``cryptography`` package (the ``crypto`` extra).
"""

from fedtune.secagg.client import ClientSession
from fedtune.secagg.fixedpoint import decode_sum, encode, max_scale
from fedtune.secagg.protocol import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SecAggParams,
    UnmaskRequest,
    UnmaskShares,
)
from fedtune.secagg.server import ServerSession

__all__ = [
    "ClientSession",
    "EncryptedShare",
    "KeyAdvert",
    "MaskedInput",
    "SecAggParams",
    "ServerSession",
    "UnmaskRequest",
    "UnmaskShares",
    "decode_sum",
    "encode",
    "max_scale",
]
