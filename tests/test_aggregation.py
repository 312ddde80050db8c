"""Aggregation strategies, update codecs and update validation."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.compression.codecs import get_codec
from fedtune.coordinator.validation import validate_update
from fedtune.errors import InvalidInput
from fedtune.strategies import WeightedDelta, get_strategy


def _rand(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g), "a.lora_B.weight": torch.randn(16, 4, generator=g)}


def test_fedavg_weights_by_example_count() -> None:
    d1, d2, d3 = _rand(1), _rand(2), _rand(3)
    out = get_strategy("fedavg").combine([WeightedDelta(d1, 10), WeightedDelta(d2, 30), WeightedDelta(d3, 60)])
    for k in d1:
        torch.testing.assert_close(out[k], 0.1 * d1[k] + 0.3 * d2[k] + 0.6 * d3[k])


def test_fedavg_does_not_depend_on_arrival_order() -> None:
    ups = [WeightedDelta(_rand(i), i + 1) for i in range(5)]
    a = get_strategy("fedavg").combine(ups)
    b = get_strategy("fedavg").combine(list(reversed(ups)))
    for k in a:
        assert torch.equal(a[k], b[k])


def test_fedavg_of_one_client_is_its_delta() -> None:
    d = _rand(7)
    out = get_strategy("fedavg").combine([WeightedDelta(d, 5)])
    for k in d:
        torch.testing.assert_close(out[k], d[k])


def test_fedavg_refuses_empty_rounds() -> None:
    with pytest.raises(InvalidInput):
        get_strategy("fedavg").combine([])
    with pytest.raises(InvalidInput):
        get_strategy("fedavg").combine([WeightedDelta(_rand(1), 0)])


def test_unknown_strategy_and_codec_are_named() -> None:
    with pytest.raises(InvalidInput, match="unknown aggregation strategy 'krumm'.*known: bulyan"):
        get_strategy("krumm")
    with pytest.raises(InvalidInput, match="int3"):
        get_codec("int3")


@pytest.mark.parametrize(("name", "tol"), [("fp32", 0.0), ("fp16", 1e-3)])
def test_codecs_round_trip_within_their_error(name: str, tol: float) -> None:
    codec = get_codec(name)
    d = {k: v * 0.01 for k, v in _rand(3).items()}
    wire = codec.encode(d)
    assert all(v.dtype == codec.wire_dtype(k) for k, v in wire.items())
    back = codec.decode(wire)
    for k, v in d.items():
        assert back[k].dtype == torch.float32
        assert float((back[k] - v).abs().max()) <= tol * float(v.abs().max())


def test_validation_accepts_a_good_update_and_names_bad_tensors() -> None:
    codec = get_codec("fp32")
    d = _rand(1)
    schema = {k: tuple(v.shape) for k, v in d.items()}
    assert validate_update(d, schema, codec).keys() == d.keys()
    cases = {
        "lacks tensor 'a.lora_B.weight'": {"a.lora_A.weight": d["a.lora_A.weight"]},
        "unexpected tensor 'x'": {**d, "x": torch.zeros(1)},
        "has shape (2, 2)": {**d, "a.lora_A.weight": torch.zeros(2, 2)},
        "has dtype torch.float64": {**d, "a.lora_A.weight": d["a.lora_A.weight"].double()},
        "non-finite": {**d, "a.lora_A.weight": torch.full((4, 16), math.nan)},
    }
    for message, bad in cases.items():
        with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_update(bad, schema, codec)
    big = {k: v * 100 for k, v in d.items()}
    with pytest.raises(InvalidInput, match="over the job's bound"):
        validate_update(big, schema, codec, max_norm=1.0)
