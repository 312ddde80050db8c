"""Update codecs (fp16, bf16, int8, top-k), their wire validation, byte accounting and error feedback."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedtune.compression.codecs import get_codec, int8_scale_count, topk_count, wire_bytes
from fedtune.compression.feedback import ErrorFeedback
from fedtune.coordinator.validation import validate_update
from fedtune.errors import InvalidInput
from fedtune.peft_io import tensors_to_bytes

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


def test_topk_with_error_feedback_tracks_the_true_sum(tmp_path: Path) -> None:
    schema = {"a": (8, 64), "b": (64, 8)}
    codec = get_codec("topk:0.05")
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
    assert err < 0.15 and err_without > 0.5
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
