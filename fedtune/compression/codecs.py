"""Update codecs: how an adapter delta is encoded into the tensors that travel.

A codec is a small registered unit (as peft registers tuners): ``encode`` turns fp32 deltas into
the tensors put on the wire, ``check`` tells whether received tensors are exactly the codec's wire
format for the job's adapter, ``decode`` turns them back into fp32. The coordinator only accepts the
codec its job names.

Wire formats, for each adapter tensor NAME of shape S:

- ``fp32`` / ``fp16`` / ``bf16``: NAME, shape S, in that dtype.
- ``int8``: ``NAME.q`` (int8, shape S, values in [-127, 127]) and ``NAME.scale`` (fp32, one per slice
  of the shorter axis, see `int8_scale_count`); NAME = q * scale, rounded stochastically (unbiased).
- ``topk:F``: ``NAME.idx`` (int32, flat indices into S, strictly increasing) and ``NAME.val`` (fp16,
  same length, at most `topk_count` (F, numel) entries); everything else is zero.

The packed codecs of `fedtune.compression.packed` (``int4``, ``int2``, ``topk:F+int8``,
``topk:F+int4``) instead send the whole adapter, flattened, as two or three tensors of low-bit
integers with block scales: far fewer bytes, and no safetensors header per adapter tensor.

Only fp32 is additive (a sum of encodings is the encoding of the sum), so only fp32 composes with
secure aggregation; every other codec relies on the client's error feedback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Protocol

import torch

from fedtune.compression.flat import Schema, check_names, finite_delta, topk_count
from fedtune.compression.packed import BlockIntCodec, TopKIntCodec
from fedtune.errors import InvalidInput

__all__ = ["CODECS", "Schema", "UpdateCodec", "get_codec", "int8_scale_count", "topk_count", "wire_bytes"]


class UpdateCodec(Protocol):
    """Encodes fp32 adapter deltas for the wire and decodes them back."""

    name: str
    # Whether decode(a) + decode(b) == decode of a sum: needed by secure aggregation.
    additive: bool

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors to serialize."""
        ...

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """Raises `InvalidInput` naming the tensor unless ``wire`` is exactly this codec's format."""
        ...

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """fp32 deltas back from checked wire tensors (``schema`` gives shapes the wire lacks)."""
        ...

    def wire_dtype(self, name: str) -> torch.dtype:
        """The dtype each wire tensor must have (validated on arrival)."""
        ...


def wire_bytes(wire: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in ``wire`` (the safetensors blob adds a header of a few dozen bytes a tensor)."""
    return sum(t.nbytes for t in wire.values())


def _check_tensor(codec: UpdateCodec, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise InvalidInput(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    want = codec.wire_dtype(name)
    if tensor.dtype != want:
        raise InvalidInput(f"tensor {name!r} has dtype {tensor.dtype}, codec {codec.name} sends {want}")


class CastCodec:
    """Casts every tensor to one floating dtype (fp32 is the identity)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        # Only fp32 adds exactly; a sum of fp16/bf16 values is rounded again.
        self.additive = dtype == torch.float32

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Casts to the wire dtype."""
        wire = {k: v.detach().to(self.dtype).contiguous() for k, v in delta.items()}
        for k, v in wire.items():
            if not torch.isfinite(v).all():
                raise InvalidInput(f"delta tensor {k!r} is not finite in {self.dtype}; use codec fp32 or bf16")
        return wire

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """Same names and shapes as the adapter, in the codec's dtype."""
        check_names(wire, set(schema))
        for name, tensor in wire.items():
            _check_tensor(self, name, tensor, schema[name])

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """Casts back to fp32."""
        return {k: v.to(torch.float32) for k, v in wire.items()}

    def wire_dtype(self, name: str) -> torch.dtype:
        """Every tensor has the codec's dtype."""
        return self.dtype


def int8_scale_count(shape: tuple[int, ...]) -> tuple[int, int]:
    """Which axis of the 2-D view ``[shape[0], rest]`` carries int8 scales, and how many there are.

    One scale per slice of the shorter axis: for LoRA that is one per rank component of both
    ``lora_A`` [r, in] (rows) and ``lora_B`` [out, r] (columns). Per output row of ``lora_B`` would be
    one fp32 scale per r int8 values, 50% overhead at r=8. Tensors of fewer than 2 dims get one scale.
    """
    rows, rest = _matrix_shape(shape)
    return (0, rows) if rows <= rest else (1, rest)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view ``[shape[0], rest]`` int8 scales are taken over; one row for fewer than 2 dims."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


class Int8Codec:
    """int8 values with fp32 scales per slice, stochastic rounding so the decoded delta is unbiased.

    Each entry decodes within one scale step of the truth (|error| < scale of its slice, where scale
    is the slice's absmax / 127), and its expectation over the rounding is exact.
    """

    name = "int8"
    # Every client has its own scales, so int8 values of two clients do not add.
    additive = False

    def encode(
        self, delta: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Quantizes each tensor; ``generator`` makes the rounding reproducible (default: fresh seed)."""
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        wire: dict[str, torch.Tensor] = {}
        for name, tensor in delta.items():
            x = finite_delta(name, tensor)
            axis, count = int8_scale_count(tuple(x.shape))
            view = x.reshape(_matrix_shape(tuple(x.shape)))
            view = view if axis == 0 else view.t()
            absmax = view.abs().amax(dim=1) if view.numel() else torch.zeros(count)
            scale = absmax / 127
            y = view / torch.where(scale > 0, scale, 1.0)[:, None]
            # floor(y + u), u ~ U[0, 1): rounds up with probability frac(y), so E[q] = y.
            q = torch.floor(y + torch.rand(y.shape, generator=generator)).clamp_(-127, 127).to(torch.int8)
            q = q if axis == 0 else q.t()
            wire[f"{name}.q"] = q.reshape(x.shape).contiguous()
            wire[f"{name}.scale"] = scale.contiguous()
        return wire

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """``NAME.q`` int8 of the adapter's shape within [-127, 127]; ``NAME.scale`` finite, >= 0."""
        check_names(wire, {f"{n}.{part}" for n in schema for part in ("q", "scale")})
        for name, shape in schema.items():
            q, scale = wire[f"{name}.q"], wire[f"{name}.scale"]
            _check_tensor(self, f"{name}.q", q, shape)
            _check_tensor(self, f"{name}.scale", scale, (int8_scale_count(shape)[1],))
            if q.numel() and int(q.to(torch.int16).abs().max()) > 127:
                raise InvalidInput(f"tensor {name + '.q'!r} has values outside [-127, 127]")
            if not torch.isfinite(scale).all():
                raise InvalidInput(f"tensor {name + '.scale'!r} has non-finite scales")
            if (scale < 0).any():
                raise InvalidInput(f"tensor {name + '.scale'!r} has negative scales")

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """q * scale, in fp32."""
        out: dict[str, torch.Tensor] = {}
        for key, q in wire.items():
            if not key.endswith(".q"):
                continue
            name = key[: -len(".q")]
            scale = wire[f"{name}.scale"].to(torch.float32)
            axis, _ = int8_scale_count(tuple(q.shape))
            view = q.to(torch.float32).reshape(_matrix_shape(tuple(q.shape)))
            view = view * (scale[:, None] if axis == 0 else scale[None, :])
            out[name] = view.reshape(q.shape)
        return out

    def wire_dtype(self, name: str) -> torch.dtype:
        """int8 values, fp32 scales."""
        return torch.float32 if name.endswith(".scale") else torch.int8


class TopKCodec:
    """Keeps the largest-magnitude ``fraction`` of each tensor's entries: exact values there, zero elsewhere.

    The budget is per tensor rather than over the whole update so that every tensor (both LoRA
    factors, whose deltas differ in scale by orders of magnitude early on) moves every round, the
    bytes per round are fixed before training, and each tensor is checked on its own. What is left
    out is carried by the client's `fedtune.compression.feedback.ErrorFeedback`. Values travel as
    fp16 (relative error <= 2**-11 in its normal range).
    """

    additive = False
    IDX_DTYPE = torch.int32
    VAL_DTYPE = torch.float16

    def __init__(self, name: str, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise InvalidInput(f"codec {name!r}: fraction must be in (0, 1], got {fraction}")
        self.name = name
        self.fraction = fraction

    def encode(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat sorted indices and fp16 values of each tensor's largest entries."""
        wire: dict[str, torch.Tensor] = {}
        for name, tensor in delta.items():
            flat = finite_delta(name, tensor).reshape(-1)
            if flat.numel() > torch.iinfo(self.IDX_DTYPE).max:
                raise InvalidInput(f"delta tensor {name!r} has too many entries for int32 indices")
            k = topk_count(self.fraction, flat.numel()) if flat.numel() else 0
            idx = flat.abs().topk(k, sorted=False).indices.sort().values
            val = flat[idx].to(self.VAL_DTYPE)
            if not torch.isfinite(val).all():
                raise InvalidInput(f"delta tensor {name!r} has values beyond fp16 range; use codec fp32 or bf16")
            wire[f"{name}.idx"] = idx.to(self.IDX_DTYPE).contiguous()
            wire[f"{name}.val"] = val.contiguous()
        return wire

    def check(self, wire: Mapping[str, torch.Tensor], schema: Schema) -> None:
        """1-D ``NAME.idx`` int32 and ``NAME.val`` fp16 of one length, at most the fraction, indices
        strictly increasing and inside the tensor."""
        check_names(wire, {f"{n}.{part}" for n in schema for part in ("idx", "val")})
        for name, shape in schema.items():
            idx, val = wire[f"{name}.idx"], wire[f"{name}.val"]
            for part, t in ((f"{name}.idx", idx), (f"{name}.val", val)):
                if t.dim() != 1:
                    raise InvalidInput(f"tensor {part!r} has shape {tuple(t.shape)}, expected one dimension")
                _check_tensor(self, part, t, (t.numel(),))
            if idx.numel() != val.numel():
                raise InvalidInput(f"tensor {name!r}: {idx.numel()} indices but {val.numel()} values")
            numel = math.prod(shape)
            allowed = topk_count(self.fraction, numel) if numel else 0
            if idx.numel() > allowed:
                raise InvalidInput(f"tensor {name!r} sends {idx.numel()} entries, codec {self.name} "
                                   f"allows {allowed} of {numel}")
            if idx.numel() == 0:
                continue
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                bad = lo if lo < 0 else hi
                raise InvalidInput(f"tensor {name + '.idx'!r} has index {bad} out of range [0, {numel})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise InvalidInput(f"tensor {name + '.idx'!r} has unsorted or duplicate indices")

    def decode(self, wire: Mapping[str, torch.Tensor], schema: Schema | None = None) -> dict[str, torch.Tensor]:
        """Scatters the values into zeros of each tensor's shape (which only ``schema`` knows)."""
        if schema is None:
            raise ValueError(f"codec {self.name} cannot decode without the adapter schema: "
                             "call decode(wire, schema)")
        out: dict[str, torch.Tensor] = {}
        for name, shape in schema.items():
            flat = torch.zeros(math.prod(shape), dtype=torch.float32)
            flat[wire[f"{name}.idx"].to(torch.int64)] = wire[f"{name}.val"].to(torch.float32)
            out[name] = flat.reshape(shape)
        return out

    def wire_dtype(self, name: str) -> torch.dtype:
        """int32 indices, fp16 values."""
        return self.IDX_DTYPE if name.endswith(".idx") else self.VAL_DTYPE


CODECS: dict[str, UpdateCodec] = {
    "fp32": CastCodec("fp32", torch.float32),
    "fp16": CastCodec("fp16", torch.float16),
    "bf16": CastCodec("bf16", torch.bfloat16),
    "int8": Int8Codec(),
    "int4": BlockIntCodec("int4", 4),
    "int2": BlockIntCodec("int2", 2),
}
_FRACTION = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_TOPK = re.compile(f"topk:{_FRACTION}")
_TOPK_INT = re.compile(f"topk:{_FRACTION}\\+int(4|8)")


def get_codec(name: str) -> UpdateCodec:
    """A registered codec by name, ``topk:FRACTION`` (e.g. ``topk:0.05``) or ``topk:FRACTION+int8|int4``
    (e.g. ``topk:0.3+int8``); its ``name`` is ``name``."""
    if name in CODECS:
        return CODECS[name]
    match = _TOPK.fullmatch(name)
    if match:
        return TopKCodec(name, float(match.group(1)))
    match = _TOPK_INT.fullmatch(name)
    if match:
        return TopKIntCodec(name, float(match.group(1)), int(match.group(2)))
    raise InvalidInput(f"unknown update codec {name!r}; known: {', '.join(sorted(CODECS))}, topk:FRACTION, "
                       "topk:FRACTION+int8, topk:FRACTION+int4")
