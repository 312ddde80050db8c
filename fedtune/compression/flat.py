"""What the packed codecs share: the adapter as one vector, integers with block scales, bit packing.

Both sides know the job's adapter schema, so a codec may send the whole delta as a few flat tensors
instead of one or two tensors per adapter tensor (each of which costs ~60-120 B of safetensors
header, as much as the data of a small LoRA factor once compressed). The order is the sorted tensor
names, never a dict's insertion order, which differs between the client's adapter and a stored blob.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedtune.errors import InvalidInput

Schema = Mapping[str, tuple[int, ...]]

# Scales travel as bf16: fp32's range (a LoRA delta of 1e-7 still has a normal scale, where fp16
# would go subnormal and lose its precision) at 2 bytes.
SCALE_DTYPE = torch.bfloat16
# Scales are rounded up by at least bf16's rounding error so that |x| / scale <= the top level.
_SCALE_ROUND_UP = 1 + 2.0**-7
# Fractions of a block's absmax tried as its top level (see `quantize`).
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def check_names(wire: Mapping[str, torch.Tensor], expected: set[str]) -> None:
    """Raises `InvalidInput` naming the first missing or unexpected tensor of ``wire``."""
    missing = sorted(expected - set(wire))
    if missing:
        raise InvalidInput(f"update lacks tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(wire) - expected)
    if extra:
        raise InvalidInput(f"update has unexpected tensor {extra[0]!r}")


def finite_delta(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32, or `InvalidInput` if it has NaN or inf (raised on the client, where the cause is)."""
    x = tensor.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise InvalidInput(f"delta tensor {name!r} has non-finite values; nothing to encode")
    return x


def topk_count(fraction: float, numel: int) -> int:
    """Entries kept of ``numel`` entries: ceil(fraction * numel), at least one."""
    # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 keeps 3, not 4.
    return min(numel, max(1, math.ceil(round(fraction * numel, 9))))


def lengths(schema: Schema) -> list[int]:
    """Entries of each adapter tensor, in the flat vector's order (sorted names)."""
    return [math.prod(schema[name]) for name in sorted(schema)]


def flatten(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The delta as one fp32 vector: each tensor flattened, in sorted name order."""
    parts = [finite_delta(name, delta[name]).reshape(-1) for name in sorted(delta)]
    return torch.cat(parts) if parts else torch.zeros(0)


def unflatten(vector: torch.Tensor, schema: Schema) -> dict[str, torch.Tensor]:
    """Inverse of `flatten`: the tensors of ``schema`` cut from ``vector``."""
    names = sorted(schema)
    pieces = vector.split(lengths(schema)) if names else ()
    return {name: piece.reshape(schema[name]).clone() for name, piece in zip(names, pieces, strict=True)}


def block_count(segments: Sequence[int], block: int) -> int:
    """Blocks of at most ``block`` values when each segment is cut into blocks on its own."""
    return sum(-(-n // block) for n in segments)


def _block_ids(segments: Sequence[int], block: int) -> torch.Tensor:
    """For each value of the concatenated segments, the index of its block (blocks never span segments)."""
    ids, base = [], 0
    for n in segments:
        ids.append(base + torch.arange(n) // block)
        base += -(-n // block)
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)


def top_level(bits: int) -> int:
    """Largest magnitude of a signed ``bits``-bit code: levels are symmetric, -L..L (L = 2**(bits-1) - 1)."""
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, segments: Sequence[int], bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of ``x`` in -L..L, offset by 2**(bits-1) to fit ``bits`` unsigned bits, and a scale per block.

    A value decodes as (code - offset) * scale, rounded to the nearest level. Each block's scale is
    c * absmax / L (bf16, rounded up) for the clip c in `CLIPS` that gives the block the smallest
    squared error: clipping a few outliers buys finer steps for the rest (a ternary code's error on a
    LoRA delta drops 2.5x), and what the clip cuts off is carried by the client's error feedback.
    So a value within L steps decodes within half a step, a larger one decodes as +-L steps, and no
    block's error is larger than with c = 1 (plain absmax scaling).

    Returns:
        ``(codes, scales)``: uint8 codes (unpacked), one per value, and bf16 scales, one per block.
    """
    level = top_level(bits)
    ids = _block_ids(segments, block)
    count = block_count(segments, block)
    absmax = torch.zeros(count).scatter_reduce(0, ids, x.abs(), "amax")
    best_scales, best_error = torch.zeros(count, dtype=SCALE_DTYPE), torch.full((count,), math.inf)
    for clip in CLIPS:
        scales = (absmax * clip / level * _SCALE_ROUND_UP).to(SCALE_DTYPE)
        q, per_value = _levels(x, scales, ids, level)
        error = torch.zeros(count).index_add_(0, ids, (q * per_value - x).pow(2))
        better = error < best_error
        best_scales, best_error = torch.where(better, scales, best_scales), torch.where(better, error, best_error)
    q, _ = _levels(x, best_scales, ids, level)
    return (q + 2 ** (bits - 1)).to(torch.uint8), best_scales


def _levels(x: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest levels of ``x`` under ``scales`` (as floats in -level..level) and each value's scale."""
    per_value = scales.to(torch.float32)[ids]
    return torch.round(x / torch.where(per_value > 0, per_value, 1.0)).clamp_(-level, level), per_value


def dequantize(codes: torch.Tensor, scales: torch.Tensor, segments: Sequence[int], bits: int,
               block: int) -> torch.Tensor:
    """fp32 values of `quantize`'s codes."""
    ids = _block_ids(segments, block)
    return (codes.to(torch.float32) - 2 ** (bits - 1)) * scales.to(torch.float32)[ids]


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits packed end to end."""
    return -(-count * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2**bits packed end to end, least significant bits first; the last byte zero-padded."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:
        per = 8 // bits
        padded = torch.zeros(packed_size(codes.numel(), bits) * per, dtype=torch.int32)
        padded[: codes.numel()] = codes.to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (padded.reshape(-1, per) << shifts).sum(1).to(torch.uint8)
    # Other widths go through single bits: n * bits bytes of scratch.
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_stream = ((codes.to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)
    return pack(bit_stream, 1)


def unpack(data: torch.Tensor, bits: int, count: int) -> tuple[torch.Tensor, bool]:
    """``count`` codes back from `pack`'s bytes (``data`` must be ``packed_size(count, bits)`` bytes long).

    Returns:
        ``(codes, clean)``: uint8 codes, and whether every padding bit after them is zero.
    """
    if bits == 8:
        return data.to(torch.uint8), True
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        codes = ((data.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)).reshape(-1)
        return codes[:count].to(torch.uint8), not bool(codes[count:].any())
    bit_stream, _ = unpack(data, 1, data.numel() * 8)
    used = bit_stream[: count * bits].reshape(count, bits).to(torch.int32)
    codes = (used << torch.arange(bits, dtype=torch.int32)).sum(1)
    return codes.to(torch.uint8), not bool(bit_stream[count * bits:].any())
