"""Packed codecs: the whole adapter delta in three flat tensors, as low-bit integers with block scales.

Wire formats, over the adapter flattened in sorted tensor-name order (N values, see `flat`), with
B-bit codes packed end to end into uint8 (least significant bits first, the last byte's spare bits
zero) and one bf16 scale per block of at most 64 values (blocks never span two adapter tensors):

- ``intB`` (B = 2 or 4): ``q``, the N codes; ``scale``, one per block of each tensor. Code c
  decodes as (c - 2**(B-1)) * scale, levels -L..L with L = 2**(B-1) - 1, so the code 0 is refused.
  ``int2`` is ternary: -scale, 0 or +scale.
- ``topk:F+intB`` (B = 4 or 8): ``mask``, N bits, set where a value is sent (at most
  ``topk_count(F, N)``: the largest magnitudes over the whole adapter); ``q``, one code per set bit in
  flat order; ``scale``, one per block of the values sent from each tensor. Everything else is zero.

Rounding is to the nearest level, and each block's scale is its absmax / L or a clipped fraction of
it, whichever gives the block the smallest error (`flat.quantize`). What a value misses, and what a
clip cuts off, is carried by the client's error feedback, which these codecs rely on: they are not
additive (each client has its own scales and its own mask), so secure aggregation refuses them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.compression.flat import (
    SCALE_DTYPE,
    Schema,
    block_count,
    check_names,
    dequantize,
    flatten,
    lengths,
    pack,
    packed_size,
    quantize,
    top_level,
    topk_count,
    unflatten,
    unpack,
)
from fedtune.errors import InvalidInput

BLOCK = 64  # values per scale: 0.25 bit a value for the bf16 scale


def _shapes(delta: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in delta.items()}


def _need_schema(name: str, schema: Schema | None) -> Schema:
    if schema is None:
        raise ValueError(f"codec {name} cannot decode without the adapter schema: call decode(wire, schema)")
    return schema


def _vector(wire: Mapping[str, torch.Tensor], part: str, size: int, dtype: torch.dtype, codec: str) -> torch.Tensor:
    """``wire[part]``, refused unless it is 1-D with ``size`` entries of ``dtype``."""
    t = wire[part]
    if tuple(t.shape) != (size,):
        raise InvalidInput(f"tensor {part!r} has shape {tuple(t.shape)}, expected ({size},)")
    if t.dtype != dtype:
        raise InvalidInput(f"tensor {part!r} has dtype {t.dtype}, codec {codec} sends {dtype}")
    return t


def _codes(wire: Mapping[str, torch.Tensor], count: int, bits: int, codec: str) -> torch.Tensor:
    """The ``count`` checked codes of ``wire['q']``: clean padding, every code a level."""
    data = _vector(wire, "q", packed_size(count, bits), torch.uint8, codec)
    codes, clean = unpack(data, bits, count)
    if not clean:
        raise InvalidInput("tensor 'q' has non-zero padding bits after its last code")
    if bool((codes == 0).any()):
        level = top_level(bits)
        raise InvalidInput(f"tensor 'q' has a code outside the levels -{level}..{level}")
    return codes


def _check_scales(wire: Mapping[str, torch.Tensor], count: int, codec: str) -> None:
    scale = _vector(wire, "scale", count, SCALE_DTYPE, codec)
    if not torch.isfinite(scale).all():
        raise InvalidInput("tensor 'scale' has non-finite scales")
    if bool((scale < 0).any()):
        raise InvalidInput("tensor 'scale' has negative scales")


class BlockIntCodec:
    """``intB``: every value of the adapter as a B-bit integer with one bf16 scale per 64 values.

    Error bound: a value within the block's top level (L steps) decodes within half a step, one
    beyond it decodes as +-L steps; the step is at most the block's absmax / L (rounded up to bf16),
    e.g. 1/7 of it for int4 and all of it for int2, and no block's squared error exceeds the one
    plain absmax scaling gives.
    """

    additive = False

    def __init__(self, name: str, bits: int) -> None:
        self.name = name
        self.bits = bits

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Codes and block scales of the flattened delta."""
        segments = lengths(_shapes(delta))
        codes, scales = quantize(flatten(delta), segments, self.bits, BLOCK)
        return {"q": pack(codes, self.bits), "scale": scales}

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """``q`` uint8 of exactly N codes' bytes, every code a level; ``scale`` bf16, one per block, finite, >= 0."""
        check_names(wire, {"q", "scale"})
        segments = lengths(schema)
        _check_scales(wire, block_count(segments, BLOCK), self.name)
        _codes(wire, sum(segments), self.bits, self.name)

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """code * scale, cut back into the adapter's tensors (whose shapes only ``schema`` knows)."""
        schema = _need_schema(self.name, schema)
        segments = lengths(schema)
        codes, _ = unpack(wire["q"], self.bits, sum(segments))
        return unflatten(dequantize(codes, wire["scale"], segments, self.bits, BLOCK), schema)

    def wire_dtype(self, name: str) -> torch.dtype:
        """uint8 codes, bf16 scales."""
        return SCALE_DTYPE if name == "scale" else torch.uint8


class TopKIntCodec:
    """``topk:F+intB``: the largest-magnitude fraction F of the whole adapter, as B-bit integers, and a bitmap.

    The budget is global, so the tensors whose deltas are largest this round get most of it; what any
    tensor does not send stays in the client's error feedback until it is large enough to go.
    Error bound: a value sent decodes as in ``intB`` over the values sent, and every value left out
    is no larger than the smallest one sent.
    """

    additive = False

    def __init__(self, name: str, fraction: float, bits: int) -> None:
        if not 0 < fraction <= 1:
            raise InvalidInput(f"codec {name!r}: fraction must be in (0, 1], got {fraction}")
        self.name = name
        self.fraction = fraction
        self.bits = bits

    def budget(self, numel: int) -> int:
        """Values sent of an adapter of ``numel`` values."""
        return topk_count(self.fraction, numel) if numel else 0

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bitmap, codes and block scales of the largest entries of the flattened delta."""
        segments = lengths(_shapes(delta))
        x = flatten(delta)
        chosen = torch.zeros(x.numel(), dtype=torch.uint8)
        chosen[x.abs().topk(self.budget(x.numel()), sorted=False).indices] = 1
        kept = [int(part.sum()) for part in chosen.split(segments)] if segments else []
        codes, scales = quantize(x[chosen.bool()], kept, self.bits, BLOCK)
        return {"mask": pack(chosen, 1), "q": pack(codes, self.bits), "scale": scales}

    def _kept(self, wire: Mapping[str, torch.Tensor], segments: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The checked bitmap and the values it sends from each tensor."""
        numel = sum(segments)
        bitmap, clean = unpack(_vector(wire, "mask", packed_size(numel, 1), torch.uint8, self.name), 1, numel)
        if not clean:
            raise InvalidInput("tensor 'mask' has bits set past the adapter's last value")
        sent, allowed = int(bitmap.sum()), self.budget(numel)
        if sent > allowed:
            raise InvalidInput(f"tensor 'mask' sends {sent} values, codec {self.name} allows {allowed} of {numel}")
        return bitmap, [int(part.sum()) for part in bitmap.split(segments)] if segments else []

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """``mask`` of N bits with at most the budget set; ``q`` and ``scale`` as ``intB`` over the values sent."""
        check_names(wire, {"mask", "q", "scale"})
        _, kept = self._kept(wire, lengths(schema))
        _check_scales(wire, block_count(kept, BLOCK), self.name)
        _codes(wire, sum(kept), self.bits, self.name)

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """The values sent scattered into zeros of the adapter's shapes (which only ``schema`` knows)."""
        schema = _need_schema(self.name, schema)
        segments = lengths(schema)
        bitmap, kept = self._kept(wire, segments)
        codes, _ = unpack(wire["q"], self.bits, sum(kept))
        flat = torch.zeros(sum(segments))
        flat[bitmap.bool()] = dequantize(codes, wire["scale"], kept, self.bits, BLOCK)
        return unflatten(flat, schema)

    def wire_dtype(self, name: str) -> torch.dtype:
        """uint8 bitmap and codes, bf16 scales."""
        return SCALE_DTYPE if name == "scale" else torch.uint8
