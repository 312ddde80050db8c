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
        codec: The job's codec.
        max_norm: Optional bound on the L2 norm of the whole delta.

    Raises:
        InvalidInput: naming the first tensor that is missing, unexpected, of the wrong shape or
            dtype, or not finite, or the norm when it is over the bound.
    """
    missing = sorted(set(schema) - set(wire))
    if missing:
        raise InvalidInput(f"update lacks tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(wire) - set(schema))
    if extra:
        raise InvalidInput(f"update has unexpected tensor {extra[0]!r}")
    for name, tensor in wire.items():
        if tuple(tensor.shape) != schema[name]:
            raise InvalidInput(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {schema[name]}")
        want = codec.wire_dtype(name)
        if tensor.dtype != want:
            raise InvalidInput(f"tensor {name!r} has dtype {tensor.dtype}, codec {codec.name} sends {want}")
    delta = codec.decode(wire)
    sq = 0.0
    for name, tensor in delta.items():
        if not torch.isfinite(tensor).all():
            raise InvalidInput(f"tensor {name!r} has non-finite values")
        sq += float(tensor.double().pow(2).sum())
    if max_norm is not None and sq**0.5 > max_norm:
        raise InvalidInput(f"update L2 norm {sq**0.5:.4g} is over the job's bound {max_norm:.4g}")
    return delta
