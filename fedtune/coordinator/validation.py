"""Checks an uploaded update against the job's adapter before anything is stored."""

from __future__ import annotations

import torch

from fedtune.compression.codecs import UpdateCodec
from fedtune.errors import InvalidInput


def validate_update(
    wire: dict[str, torch.Tensor],
    schema: dict[str, tuple[int, ...]],
    codec: UpdateCodec,
    max_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """Validates wire tensors and returns the decoded fp32 delta.

    Args:
        wire: Tensors as received.
        schema: Tensor name -> shape of the job's adapter.
        codec: The job's codec; its ``check`` knows which wire tensors each adapter tensor becomes.
        max_norm: Optional bound on the L2 norm of the whole delta.

    Raises:
        InvalidInput: naming the first tensor that is missing, unexpected, of the wrong shape or
            dtype, otherwise not in the codec's format, or not finite, or the norm when it is over
            the bound.
    """
    codec.check(wire, schema)
    delta = codec.decode(wire, schema)
    sq = 0.0
    for name, tensor in delta.items():
        if not torch.isfinite(tensor).all():
            raise InvalidInput(f"tensor {name!r} has non-finite values")
        sq += float(tensor.double().pow(2).sum())
    if max_norm is not None and sq**0.5 > max_norm:
        raise InvalidInput(f"update L2 norm {sq**0.5:.4g} is over the job's bound {max_norm:.4g}")
    return delta
