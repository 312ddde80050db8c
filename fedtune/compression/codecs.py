"""Update codecs: how an adapter delta is encoded into the tensors that travel.

A codec is a small registered unit (as peft registers tuners): ``encode`` turns fp32 deltas into
the tensors put on the wire, ``decode`` turns them back into fp32. The coordinator only accepts the
codec its job names.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedtune.errors import InvalidInput


class UpdateCodec(Protocol):
    """Encodes fp32 adapter deltas for the wire and decodes them back."""

    name: str
    # Whether decode(a) + decode(b) == decode of a sum: needed by secure aggregation.
    additive: bool

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors to serialize."""
        ...

    def decode(self, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fp32 deltas back from the wire tensors."""
        ...

    def wire_dtype(self, name: str) -> torch.dtype:
        """The dtype each wire tensor must have (validated on arrival)."""
        ...


class CastCodec:
    """Casts every tensor to one floating dtype (fp32 is the identity)."""

    additive = False

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Casts to the wire dtype."""
        return {k: v.detach().to(self.dtype).contiguous() for k, v in delta.items()}

    def decode(self, wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Casts back to fp32."""
        return {k: v.to(torch.float32) for k, v in wire.items()}

    def wire_dtype(self, name: str) -> torch.dtype:
        """Every tensor has the codec's dtype."""
        return self.dtype


CODECS: dict[str, UpdateCodec] = {
    "fp32": CastCodec("fp32", torch.float32),
    "fp16": CastCodec("fp16", torch.float16),
}


def get_codec(name: str) -> UpdateCodec:
    """A registered codec by name."""
    try:
        return CODECS[name]
    except KeyError:
        raise InvalidInput(f"unknown update codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
