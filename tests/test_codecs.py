"""Update codecs (fp16, bf16, int8, top-k), their wire validation, byte accounting and error feedback."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.compression.codecs import get_codec, int8_scale_count, topk_count, wire_bytes
from fedtune.compression.feedback import ErrorFeedback
from fedtune.compression.flat import pack, packed_size, unpack
from fedtune.coordinator.validation import validate_update
from fedtune.errors import InvalidInput
from fedtune.peft_io import tensors_to_bytes
from tests.conftest import make_spec, run_agents

SCHEMA = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4), "a.bias": (16,)}
A, B = "a.lora_A.weight", "a.lora_B.weight"


def _delta(seed: int, schema: dict[str, tuple[int, ...]] = SCHEMA, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * scale for k, shape in schema.items()}


def _lora_update() -> dict[str, torch.Tensor]:
    """24 tensors of a rank-8 LoRA on 12 projections of a 768-wide model."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(12):
        out[f"layers.{i}.lora_A.weight"] = torch.randn(8, 768, generator=g) * 1e-3
        out[f"layers.{i}.lora_B.weight"] = torch.randn(768, 8, generator=g) * 1e-3
    return out


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


@pytest.mark.parametrize(("name", "unit_roundoff"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_casts_round_trip_within_unit_roundoff(name: str, unit_roundoff: float) -> None:
    codec = get_codec(name)
    d = _delta(1)
    back = validate_update(codec.encode(d), SCHEMA, codec)
    for k, v in d.items():
        # Relative in the normal range; fp16 subnormals (< 6e-5) are off by at most half their spacing.
        assert ((back[k] - v).abs() <= unit_roundoff * v.abs() + 2.0**-25).all()


def test_int8_is_within_one_step_and_unbiased() -> None:
    codec = get_codec("int8")
    d = _delta(2)
    g = torch.Generator().manual_seed(0)
    draws = 400
    total = {k: torch.zeros(shape) for k, shape in SCHEMA.items()}
    for _ in range(draws):
        wire = codec.encode(d, generator=g)  # type: ignore[call-arg]
        back = validate_update(wire, SCHEMA, codec)
        for k, v in d.items():
            axis, _ = int8_scale_count(SCHEMA[k])
            scale = wire[f"{k}.scale"]
            step = (scale[:, None] if axis == 0 else scale[None, :]) if v.dim() == 2 else scale
            assert ((back[k] - v).abs() <= step * (1 + 1e-5)).all(), k
            total[k] += back[k]
    for k, v in d.items():
        # Each draw errs by at most one step with mean zero: the mean is within ~5 sigma of the truth.
        widest = float(v.abs().max()) / 127
        assert float((total[k] / draws - v).abs().max()) < 5 * widest / (2 * math.sqrt(draws)), k


def test_int8_rounding_follows_the_generator() -> None:
    codec = get_codec("int8")
    d = _delta(3)
    same = [codec.encode(d, generator=torch.Generator().manual_seed(7)) for _ in range(2)]  # type: ignore[call-arg]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    fresh = [codec.encode(d) for _ in range(2)]
    assert any(not torch.equal(fresh[0][k], fresh[1][k]) for k in fresh[0])


def test_int8_scales_lora_factors_per_rank_component() -> None:
    assert int8_scale_count((8, 768)) == (0, 8)
    assert int8_scale_count((768, 8)) == (1, 8)
    assert int8_scale_count((16,)) == (0, 1)
    wire = get_codec("int8").encode(_delta(4))
    assert wire[f"{A}.q"].shape == (4, 16) and wire[f"{A}.scale"].shape == (4,)
    assert wire[f"{B}.q"].shape == (16, 4) and wire[f"{B}.scale"].shape == (4,)
    assert wire["a.bias.scale"].shape == (1,)


def test_topk_keeps_the_largest_entries_exactly_and_zeros_the_rest() -> None:
    codec = get_codec("topk:0.1")
    assert codec.name == "topk:0.1"
    d = _delta(5)
    wire = codec.encode(d)
    back = validate_update(wire, SCHEMA, codec)
    for k, v in d.items():
        kept = topk_count(0.1, v.numel())
        assert wire[f"{k}.idx"].numel() == kept
        mask = back[k] != 0
        assert int(mask.sum()) == kept
        # Exact up to the fp16 the values travel in.
        torch.testing.assert_close(back[k][mask], v[mask].half().float(), rtol=0, atol=0)
        assert float(v[~mask].abs().max()) <= float(v[mask].abs().min())


def test_topk_fraction_is_parsed_and_bounded() -> None:
    assert topk_count(0.05, 6144) == 308
    assert topk_count(0.3, 10) == 3
    assert topk_count(0.001, 10) == 1
    for bad in ["topk:0", "topk:1.5", "topk:", "topk:abc", "topk:-0.1", "topk: 0.1"]:
        with pytest.raises(InvalidInput, match=re.escape(repr(bad))):
            get_codec(bad)


def test_only_fp32_is_additive() -> None:
    assert get_codec("fp32").additive
    for name in ["fp16", "bf16", "int8", "topk:0.05"]:
        assert not get_codec(name).additive, name


def test_topk_decode_needs_the_schema() -> None:
    codec = get_codec("topk:0.5")
    with pytest.raises(ValueError, match="schema"):
        codec.decode(codec.encode(_delta(6)))


def _int8_wire() -> dict[str, torch.Tensor]:
    return get_codec("int8").encode(_delta(7), generator=torch.Generator().manual_seed(0))  # type: ignore[call-arg]


def _topk_wire() -> dict[str, torch.Tensor]:
    return get_codec("topk:0.25").encode(_delta(8))


Wire = dict[str, torch.Tensor]


def _with(wire: Wire, name: str, value: torch.Tensor | None) -> Wire:
    """``wire`` with one tensor replaced, or removed when ``value`` is None."""
    out = {k: v for k, v in wire.items() if k != name}
    if value is not None:
        out[name] = value
    return out


I32 = torch.int32
INT8_CASES: list[tuple[str, Callable[[Wire], Wire]]] = [
    ("lacks tensor 'a.lora_A.weight.scale'", lambda w: _with(w, f"{A}.scale", None)),
    ("unexpected tensor 'a.lora_A.weight'", lambda w: _with(w, A, torch.zeros(4, 16))),
    ("'a.lora_A.weight.q' has dtype torch.int16", lambda w: _with(w, f"{A}.q", w[f"{A}.q"].to(torch.int16))),
    ("'a.lora_A.weight.q' has shape (16, 4)", lambda w: _with(w, f"{A}.q", w[f"{A}.q"].t().contiguous())),
    ("'a.lora_B.weight.scale' has shape (16,)", lambda w: _with(w, f"{B}.scale", torch.ones(16))),
    ("'a.lora_A.weight.scale' has dtype torch.float16", lambda w: _with(w, f"{A}.scale", w[f"{A}.scale"].half())),
    ("'a.lora_A.weight.q' has values outside [-127, 127]",
     lambda w: _with(w, f"{A}.q", torch.full((4, 16), -128, dtype=torch.int8))),
    ("'a.lora_A.weight.scale' has non-finite scales", lambda w: _with(w, f"{A}.scale", torch.full((4,), math.nan))),
    ("'a.lora_B.weight.scale' has negative scales", lambda w: _with(w, f"{B}.scale", -w[f"{B}.scale"])),
    # Finite scales can still overflow once multiplied out.
    ("'a.lora_A.weight' has non-finite values", lambda w: _with(w, f"{A}.scale", torch.full((4,), 3e38))),
]

TOPK_CASES: list[tuple[str, Callable[[Wire], Wire]]] = [
    ("lacks tensor 'a.lora_B.weight.val'", lambda w: _with(w, f"{B}.val", None)),
    ("unexpected tensor 'a.lora_A.weight'", lambda w: _with(w, A, torch.zeros(4, 16))),
    ("'a.lora_A.weight.idx' has dtype torch.int64", lambda w: _with(w, f"{A}.idx", w[f"{A}.idx"].long())),
    ("'a.lora_A.weight.val' has dtype torch.float32", lambda w: _with(w, f"{A}.val", w[f"{A}.val"].float())),
    ("'a.lora_A.weight.idx' has shape (4, 4), expected one dimension",
     lambda w: _with(w, f"{A}.idx", w[f"{A}.idx"].reshape(4, 4))),
    ("'a.lora_A.weight': 16 indices but 15 values", lambda w: _with(w, f"{A}.val", w[f"{A}.val"][:15].clone())),
    ("'a.lora_A.weight' sends 17 entries, codec topk:0.25 allows 16 of 64",
     lambda w: _with(_with(w, f"{A}.idx", torch.arange(17, dtype=I32)), f"{A}.val", torch.ones(17).half())),
    ("'a.lora_A.weight.idx' has index 64 out of range [0, 64)",
     lambda w: _with(w, f"{A}.idx", torch.cat([w[f"{A}.idx"][:-1], torch.tensor([64], dtype=I32)]))),
    ("'a.lora_B.weight.idx' has index -1 out of range",
     lambda w: _with(w, f"{B}.idx", torch.cat([torch.tensor([-1], dtype=I32), w[f"{B}.idx"][1:]]))),
    ("'a.lora_A.weight.idx' has unsorted or duplicate indices", lambda w: _with(w, f"{A}.idx", w[f"{A}.idx"].flip(0))),
    ("'a.lora_B.weight.idx' has unsorted or duplicate indices",
     lambda w: _with(w, f"{B}.idx", torch.cat([w[f"{B}.idx"][:1], w[f"{B}.idx"][:-1]]))),
    ("'a.lora_A.weight' has non-finite values",
     lambda w: _with(w, f"{A}.val", torch.full((16,), math.nan, dtype=torch.float16))),
]


@pytest.mark.parametrize(("codec_name", "make", "cases"),
                         [("int8", _int8_wire, INT8_CASES), ("topk:0.25", _topk_wire, TOPK_CASES)])
def test_validation_rejects_crafted_wire_naming_the_tensor(
    codec_name: str, make: Callable[[], Wire], cases: list[tuple[str, Callable[[Wire], Wire]]]
) -> None:
    codec = get_codec(codec_name)
    good = make()
    assert validate_update(good, SCHEMA, codec).keys() == SCHEMA.keys()
    for message, corrupt in cases:
        with pytest.raises(InvalidInput, match=re.escape(message)):
            validate_update(corrupt(good), SCHEMA, codec)


def test_validation_rejects_another_codecs_wire() -> None:
    d = _delta(9)
    with pytest.raises(InvalidInput, match="has dtype torch.float16, codec bf16 sends torch.bfloat16"):
        validate_update(get_codec("fp16").encode(d), SCHEMA, get_codec("bf16"))
    with pytest.raises(InvalidInput, match="lacks tensor 'a.bias.idx'"):
        validate_update(get_codec("int8").encode(d), SCHEMA, get_codec("topk:0.1"))
    with pytest.raises(InvalidInput, match="lacks tensor 'a.bias.q'"):
        validate_update(d, SCHEMA, get_codec("int8"))


def test_compression_ratios_on_a_lora_update() -> None:
    update = _lora_update()
    fp32 = wire_bytes(update)
    assert fp32 == 24 * 6144 * 4
    ratios = {name: fp32 / wire_bytes(get_codec(name).encode(update)) for name in ["fp16", "bf16", "int8", "topk:0.05"]}
    assert ratios["fp16"] == ratios["bf16"] == 2.0
    # int8: 1 byte an entry plus 8 fp32 scales a tensor.
    assert ratios["int8"] == pytest.approx(589824 / (147456 + 24 * 8 * 4))  # 3.98x
    # topk:0.05: 308 of 6144 entries a tensor at 4 (int32 index) + 2 (fp16 value) bytes.
    assert ratios["topk:0.05"] == pytest.approx(589824 / (24 * 308 * 6))  # 13.3x
    # The safetensors blob adds its header (tens of bytes a tensor), which the caller measures.
    blob = len(tensors_to_bytes(get_codec("topk:0.05").encode(update), metadata={"codec": "topk:0.05"}))
    assert len(tensors_to_bytes(update)) / blob > 12


@pytest.mark.parametrize(("name", "lost_without"), [("topk:0.05", 0.5), ("topk:0.05+int8", 0.5), ("int2", 0.3)])
def test_error_feedback_tracks_the_true_sum(name: str, lost_without: float, tmp_path: Path) -> None:
    schema = {"a": (8, 64), "b": (64, 8)}
    codec = get_codec(name)
    g = torch.Generator().manual_seed(0)
    drift = {k: torch.randn(s, generator=g) * 0.1 for k, s in schema.items()}
    feedback = ErrorFeedback(tmp_path / "feedback.safetensors")
    true_sum = {k: torch.zeros(s) for k, s in schema.items()}
    sent_sum = {k: torch.zeros(s) for k, s in schema.items()}
    plain_sum = {k: torch.zeros(s) for k, s in schema.items()}
    residual_norms = []
    for rnd in range(200):
        delta = {k: drift[k] + torch.randn(s, generator=g) for k, s in schema.items()}
        corrected = feedback.apply(delta)
        sent = codec.decode(codec.encode(corrected), schema)
        feedback.update(sent, corrected)
        plain = codec.decode(codec.encode(delta), schema)
        for k in schema:
            true_sum[k] += delta[k]
            sent_sum[k] += sent[k]
            plain_sum[k] += plain[k]
        residual_norms.append(_norm(feedback.residual))
        # The invariant error feedback keeps: everything not yet sent is in the residual.
        for k in schema if rnd % 25 == 0 else ():
            torch.testing.assert_close(sent_sum[k] + feedback.residual[k], true_sum[k], rtol=0, atol=1e-3)
    err = _norm({k: true_sum[k] - sent_sum[k] for k in schema}) / _norm(true_sum)
    err_without = _norm({k: true_sum[k] - plain_sum[k] for k in schema}) / _norm(true_sum)
    assert err < 0.15 and err_without > lost_without
    # Bounded: no growth after the first rounds, a few deltas' worth.
    assert max(residual_norms[100:]) < 1.5 * max(residual_norms[20:100]) < 3 * _norm(delta)


def test_error_feedback_persists_atomically_and_resets_on_a_new_adapter(tmp_path: Path) -> None:
    path = tmp_path / "client" / "feedback.safetensors"
    codec = get_codec("topk:0.1")
    feedback = ErrorFeedback(path)
    assert feedback.residual == {}
    delta = _delta(10)
    assert all(torch.equal(v, delta[k]) for k, v in feedback.apply(delta).items())
    corrected = feedback.apply(delta)
    feedback.update(codec.decode(codec.encode(corrected), SCHEMA), corrected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["feedback.safetensors"]

    # A new process reads the same residual back.
    again = ErrorFeedback(path)
    assert again.residual.keys() == SCHEMA.keys()
    for k, v in feedback.residual.items():
        assert torch.equal(again.residual[k], v)
        assert float(v.abs().sum()) > 0
    torch.testing.assert_close(again.apply(delta)[A], delta[A] + feedback.residual[A])

    # Another adapter (new rank): the old residual no longer fits and is dropped, on disk too.
    other = _delta(11, {A: (8, 16), B: (16, 8)})
    assert all(torch.equal(v, other[k]) for k, v in again.apply(other).items())
    assert again.residual == {} and not path.exists()

    path.write_bytes(b"not safetensors")
    with pytest.raises(InvalidInput, match="delete it"):
        ErrorFeedback(path)


# Packed codecs: the whole adapter in three flat tensors (fedtune.compression.packed).

# 141 values: int4 codes end mid-byte, int2 codes and the mask in the middle of one.
ODD = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4), "a.bias": (13,)}
PACKED = ["int4", "int2", "topk:0.5+int4", "topk:0.3+int8"]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_pack_end_to_end_and_padding_is_checked(bits: int) -> None:
    for count in [0, 1, 7, 8, 141]:
        codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
        data = pack(codes, bits)
        assert data.dtype == torch.uint8 and data.numel() == packed_size(count, bits) == -(-count * bits // 8)
        back, clean = unpack(data, bits, count)
        assert torch.equal(back, codes) and clean
        if count * bits % 8:  # a stray bit after the last code is noticed
            dirty = data.clone()
            dirty[-1] |= 0x80
            assert unpack(dirty, bits, count)[1] is False


def _blocks(segments: list[int]) -> torch.Tensor:
    """The block index of each value: blocks of 64 values within each segment (adapter tensor)."""
    ids, base = [], 0
    for n in segments:
        ids.append(base + torch.arange(n) // 64)
        base += -(-n // 64)
    return torch.cat(ids)


def _assert_within_bound(x: torch.Tensor, got: torch.Tensor, wire: Wire, segments: list[int], level: int) -> None:
    """The packed codecs' stated bound, for flat values ``x`` decoded as ``got``, block by block."""
    ids = _blocks(segments)
    step = wire["scale"].float()[ids]
    err = got - x
    top = level * step
    inside = x.abs() <= top * (1 + 1e-6)
    assert (err[inside].abs() <= step[inside] / 2 * (1 + 1e-6)).all()
    # Beyond the top level (the block's scale was clipped): the top level, the rest left to error feedback.
    torch.testing.assert_close(got[~inside], x[~inside].sign() * top[~inside])
    # The step is at most the block's absmax / L (bf16 rounds it up by < 1.2%), and no block errs more
    # than half of that step on every value, the bound of plain absmax scaling.
    absmax = torch.zeros(int(ids.max()) + 1).scatter_reduce(0, ids, x.abs(), "amax")
    assert (wire["scale"].float() <= absmax / level * 1.012).all()
    block_sq = torch.zeros_like(absmax).index_add_(0, ids, err.pow(2))
    counts = torch.bincount(ids).float()
    assert (block_sq <= counts * (absmax / level * 1.012 / 2).pow(2) + 1e-30).all()


@pytest.mark.parametrize(("name", "level"), [("int4", 7), ("int2", 1)])
def test_dense_int_codecs_round_trip_within_their_bound(name: str, level: int) -> None:
    codec = get_codec(name)
    d = _delta(12, ODD)
    d["a.lora_B.weight"] *= 1e-4  # the factors of a LoRA delta differ in scale by orders of magnitude
    wire = codec.encode(d)
    assert set(wire) == {"q", "scale"}
    back = validate_update(wire, ODD, codec)
    names = sorted(ODD)
    x = torch.cat([d[k].reshape(-1) for k in names])
    got = torch.cat([back[k].reshape(-1) for k in names])
    _assert_within_bound(x, got, wire, [math.prod(ODD[k]) for k in names], level)
    # Scales per block: the small factor keeps its relative precision (one scale for the whole
    # adapter would send it as zeros, a relative error of 1).
    small = "a.lora_B.weight"
    assert float((back[small] - d[small]).norm() / d[small].norm()) < (0.2 if name == "int4" else 0.6)


def test_clipped_scales_cut_a_ternary_codes_error() -> None:
    """int2 picks each block's clip: on Gaussian deltas its error is well under plain absmax scaling's."""
    d = _delta(17, {"w": (64, 64)})
    got = get_codec("int2").decode(get_codec("int2").encode(d), {"w": (64, 64)})["w"]
    blocks = d["w"].reshape(-1, 64)
    plain = torch.round(blocks / blocks.abs().amax(1, keepdim=True)) * blocks.abs().amax(1, keepdim=True)
    assert float((got - d["w"]).pow(2).sum()) < 0.6 * float((plain.reshape(64, 64) - d["w"]).pow(2).sum())


@pytest.mark.parametrize(("name", "fraction", "bits"), [("topk:0.5+int4", 0.5, 4), ("topk:0.3+int8", 0.3, 8)])
def test_topk_int_keeps_the_largest_entries_of_the_whole_adapter(name: str, fraction: float, bits: int) -> None:
    codec = get_codec(name)
    d = _delta(13, ODD)
    d["a.bias"] = d["a.bias"].sign() * (1 + d["a.bias"].abs())  # globally the largest: all of it is sent
    wire = codec.encode(d)
    back = validate_update(wire, ODD, codec)
    names = sorted(ODD)
    flat = torch.cat([d[k].reshape(-1) for k in names])
    got = torch.cat([back[k].reshape(-1) for k in names])
    sent = torch.zeros(flat.numel(), dtype=torch.bool)
    sent[flat.abs().topk(topk_count(fraction, flat.numel())).indices] = True
    assert int(sent.sum()) == (71 if fraction == 0.5 else 43)
    assert torch.equal(unpack(wire["mask"], 1, flat.numel())[0].bool(), sent)
    assert sent[:13].all()  # a.bias comes first in name order
    assert bool((got[~sent] == 0).all())
    kept = [int(p.sum()) for p in sent.split([math.prod(ODD[k]) for k in names])]
    _assert_within_bound(flat[sent], got[sent], wire, kept, 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("name", PACKED)
def test_packed_codecs_do_not_depend_on_tensor_order(name: str) -> None:
    """The client's adapter and a stored blob list tensors in different orders; the flat vector does not care."""
    codec = get_codec(name)
    d = _delta(14, ODD)
    reordered = {k: d[k] for k in reversed(list(d))}
    wire = codec.encode(reordered)
    assert all(torch.equal(wire[k], v) for k, v in codec.encode(d).items())
    back = codec.decode(wire, {k: ODD[k] for k in sorted(ODD)})
    again = codec.decode(wire, {k: ODD[k] for k in reversed(list(ODD))})
    for k, shape in ODD.items():
        assert back[k].shape == shape and torch.equal(back[k], again[k])
        assert float((back[k] - d[k]).abs().max()) < float(d[k].abs().max())
    with pytest.raises(ValueError, match="schema"):
        codec.decode(wire)


def test_packed_codec_names_are_parsed_and_bounded() -> None:
    assert get_codec("topk:0.5+int4").name == "topk:0.5+int4"
    for name in PACKED:
        assert not get_codec(name).additive, name
    for bad in ["topk:0.5+int3", "topk:0.5+int16", "topk:1.5+int8", "topk:0+int4", "int4+topk:0.5",
                "topk:0.5+", "topk:0.5 +int8", "int6"]:
        with pytest.raises(InvalidInput, match=re.escape(repr(bad))):
            get_codec(bad)


def test_packed_bytes_on_a_lora_update() -> None:
    """Exact tensor bytes of each packed codec, and a safetensors header of three short names."""
    update = _lora_update()
    schema = {k: tuple(v.shape) for k, v in update.items()}
    n, blocks = 147456, 24 * 96  # 24 tensors of 6,144 values: 96 scale blocks each
    sizes = {name: {k: t.nbytes for k, t in get_codec(name).encode(update).items()} for name in PACKED}
    assert sizes["int4"] == {"q": n // 2, "scale": 2 * blocks}  # 4.25 bits a value: 7.5x fewer than fp32
    assert sizes["int2"] == {"q": n // 4, "scale": 2 * blocks}  # 2.25 bits: 14.2x
    for name, bits in [("topk:0.5+int4", 4), ("topk:0.3+int8", 8)]:
        codec = get_codec(name)
        wire = codec.encode(update)
        kept = [int(m.sum()) for m in torch.cat(
            [validate_update(wire, schema, codec)[k].reshape(-1) != 0 for k in sorted(schema)]).split(6144)]
        assert sum(kept) == topk_count(float(name[5:8]), n)
        # 1 mask bit a value, BITS a value sent, a bf16 scale per 64 values sent of each tensor.
        assert sizes[name] == {"mask": n // 8, "q": sum(kept) * bits // 8,
                               "scale": 2 * sum(-(-k // 64) for k in kept)}
    fp32 = wire_bytes(update)
    assert fp32 / sum(sizes["topk:0.5+int4"].values()) > 10 and fp32 / sum(sizes["topk:0.3+int8"].values()) > 9
    for name in PACKED:
        wire = get_codec(name).encode(update)
        blob = tensors_to_bytes(wire, metadata={"codec": name})
        assert len(blob) - wire_bytes(wire) < 250  # against ~120 B a tensor, 48 tensors, for int8 and top-k


def _set_byte(t: torch.Tensor, i: int, value: int) -> torch.Tensor:
    out = t.clone()
    out[i] = value
    return out


U8, BF16 = torch.uint8, torch.bfloat16
# ODD has 141 values: int4 sends 71 bytes of codes (the last nibble padding) and 3 scale blocks.
INT4_CASES: list[tuple[str, Callable[[Wire], Wire]]] = [
    ("lacks tensor 'scale'", lambda w: _with(w, "scale", None)),
    ("unexpected tensor 'a.bias'", lambda w: _with(w, "a.bias", torch.zeros(13))),
    ("'q' has dtype torch.int8, codec int4 sends torch.uint8", lambda w: _with(w, "q", w["q"].to(torch.int8))),
    ("'q' has shape (70,), expected (71,)", lambda w: _with(w, "q", w["q"][:70].clone())),
    ("'q' has shape (1, 71), expected (71,)", lambda w: _with(w, "q", w["q"][None])),
    ("'q' has non-zero padding bits", lambda w: _with(w, "q", _set_byte(w["q"], 70, int(w["q"][70]) | 0xF0))),
    ("'q' has a code outside the levels -7..7", lambda w: _with(w, "q", _set_byte(w["q"], 3, 0x80))),
    ("'scale' has shape (4,), expected (3,)", lambda w: _with(w, "scale", torch.ones(4, dtype=BF16))),
    ("'scale' has dtype torch.float16", lambda w: _with(w, "scale", w["scale"].half())),
    ("'scale' has non-finite scales", lambda w: _with(w, "scale", torch.full((3,), math.inf, dtype=BF16))),
    ("'scale' has negative scales", lambda w: _with(w, "scale", -w["scale"])),
    # Finite scales can still overflow once multiplied out.
    ("'a.bias' has non-finite values", lambda w: _with(w, "scale", torch.full((3,), 3e38, dtype=BF16))),
]

# topk:0.25+int8 on ODD: a mask of 18 bytes (3 padding bits), at most 36 values sent.
TOPK_INT_CASES: list[tuple[str, Callable[[Wire], Wire]]] = [
    ("lacks tensor 'mask'", lambda w: _with(w, "mask", None)),
    ("'mask' has shape (17,), expected (18,)", lambda w: _with(w, "mask", w["mask"][:17].clone())),
    ("'mask' has dtype torch.bool", lambda w: _with(w, "mask", w["mask"].bool())),
    ("'mask' has bits set past the adapter's last value", lambda w: _with(w, "mask", _set_byte(w["mask"], 17, 0xFF))),
    ("'mask' sends 37 values, codec topk:0.25+int8 allows 36 of 141", lambda w: _over_budget(w)),
    # One value fewer in the mask than there are codes: q no longer has the mask's length.
    ("'q' has shape (36,), expected (35,)",
     lambda w: _with(w, "mask", _set_byte(w["mask"], int(w["mask"].nonzero()[0]), _drop_low_bit(w["mask"])))),
    ("'q' has a code outside the levels -127..127", lambda w: _with(w, "q", _set_byte(w["q"], 0, 0))),
    ("'scale' has non-finite scales", lambda w: _with(w, "scale", torch.full_like(w["scale"], math.nan))),
]


def _drop_low_bit(mask: torch.Tensor) -> int:
    first = int(mask[int(mask.nonzero()[0])])
    return first & (first - 1)


def _over_budget(wire: Wire) -> Wire:
    """A mask with exactly one value over the budget of 36 (the first unset bits set)."""
    bits = [(int(b) >> i) & 1 for b in wire["mask"] for i in range(8)][:141]
    for i in range(141):
        if sum(bits) == 37:
            break
        bits[i] = 1
    packed = [sum(bits[j + i] << i for i in range(8) if j + i < 141) for j in range(0, 144, 8)]
    return _with(wire, "mask", torch.tensor(packed, dtype=U8))


@pytest.mark.parametrize(("codec_name", "cases"), [("int4", INT4_CASES), ("topk:0.25+int8", TOPK_INT_CASES)])
def test_validation_rejects_crafted_packed_wire(codec_name: str, cases: list[tuple[str, Callable[[Wire], Wire]]]) -> None:
    codec = get_codec(codec_name)
    good = codec.encode(_delta(15, ODD))
    assert validate_update(good, ODD, codec).keys() == ODD.keys()
    for message, corrupt in cases:
        with pytest.raises(InvalidInput, match=re.escape(message)):
            validate_update(corrupt(good), ODD, codec)


DTYPES = [torch.uint8, torch.int8, torch.int32, torch.bfloat16, torch.float16, torch.float32]


@settings(max_examples=150, deadline=None)
@given(codec_name=st.sampled_from(["int4", "int2", "topk:0.5+int4", "topk:0.25+int8"]),
       part=st.sampled_from(["mask", "q", "scale", "other"]),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       replace=st.none() | st.tuples(st.sampled_from(DTYPES), st.integers(0, 80), st.integers(0, 2**31)))
def test_hostile_packed_wire_is_refused_or_decodes_to_finite_adapter_tensors(
    codec_name: str, part: str, edits: list[tuple[int, int]], replace: tuple[torch.dtype, int, int] | None
) -> None:
    """Whatever a peer sends in place of a packed update, the coordinator answers InvalidInput or a sound delta."""
    codec = get_codec(codec_name)
    wire = dict(codec.encode(_delta(16, ODD)))
    if replace is not None:
        dtype, size, seed = replace
        raw = torch.randint(0, 256, (size * dtype.itemsize,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed))
        wire[part] = raw.view(dtype)  # any bit pattern: NaN, inf, negative, out of range
    elif part in wire:
        t = wire[part].clone()
        raw = t.view(torch.uint8)
        for i, value in edits:
            raw[i % raw.numel()] = value
        wire[part] = t
    try:
        back = validate_update(wire, ODD, codec)
    except InvalidInput:
        return
    assert {k: tuple(v.shape) for k, v in back.items()} == ODD
    assert all(bool(torch.isfinite(v).all()) for v in back.values())


@pytest.mark.integration
def test_agents_send_packed_updates_with_error_feedback(coordinator, admin, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Real agents on the job's packed codec: the coordinator checks and decodes their updates, and the job learns."""
    clients, eval_file = fed_data
    state, store = coordinator.coordinator.state, coordinator.coordinator.store
    fp32_bytes = len(store.read(state.job(admin.create_job(make_spec())).initial_adapter))
    job = admin.create_job(make_spec(eval_file, steps=5, rounds=2, clients=2).replace(
        "rounds: 2", "rounds: 2\ncodec: topk:0.5+int4"))
    run_agents(coordinator, admin, job, clients[:2], tmp_path)
    assert state.job(job).state == "finished"
    for r in state.rounds(job):
        per_client = r.metrics["bytes_up"] / r.metrics["contributors"]
        # 2,048 values: 256 B of mask, 512 B of codes, ~38 B of scales, a 232 B header and the 60 B
        # envelope, ~1,100 B against ~9,200 B of fp32 safetensors.
        assert per_client < fp32_bytes / 8, (per_client, fp32_bytes)
        assert {u.codec for u in state.updates(job, r.round)} == {"topk:0.5+int4"}
    for i in range(2):
        assert (tmp_path / f"c{i}" / "feedback" / f"{job}.safetensors").exists()
    assert state.rounds(job)[-1].metrics["eval_loss"] < json.loads(state.job(job).base_eval_json)["eval_loss"]
