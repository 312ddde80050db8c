"""Client-level DP: clipping, the noised sum and the RDP accountant against reference values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch

from fedtune.errors import InvalidInput
from fedtune.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    add_gaussian_noise,
    clip_update,
    compute_rdp,
    global_l2_norm,
    rdp_to_epsilon,
)

# (q, noise_multiplier, steps, delta) -> (epsilon, best order), computed by Opacus 1.6.0 (PyPI) with
# its default orders:
#   rdp = opacus.accountants.analysis.rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps,
#                                                     orders=RDPAccountant.DEFAULT_ALPHAS)
#   opacus.accountants.analysis.rdp.get_privacy_spent(orders=..., rdp=rdp, delta=delta)
# Both use the Balle et al. 2020 conversion, as `rdp_to_epsilon` does.
OPACUS_REFERENCE = [
    # The TF Privacy MNIST tutorial: batch 256 of 60000, z = 1.1, 60 epochs.
    ((256 / 60000, 1.1, 60 * 60000 // 256, 1e-5), (2.5965558689607486, 8.1)),
    # Federated-looking: 100 of 10000 clients a round, 1000 rounds.
    ((0.01, 1.0, 1000, 1e-6), (2.436693803022139, 8.0)),
    ((0.1, 0.8, 100, 1e-5), (12.358541266986002, 2.4)),
    # q = 1: every enrolled client every round (closed-form RDP).
    ((1.0, 2.0, 50, 1e-3), (18.021460917862246, 2.0)),
    ((0.5, 5.0, 7, 1e-4), (0.9929317343045729, 13.0)),
    ((0.05, 1.3, 300, 1e-5), (3.9967945023045246, 5.4)),
]


@pytest.mark.parametrize(("params", "expected"), OPACUS_REFERENCE)
def test_epsilon_matches_opacus(
    params: tuple[float, float, int, float], expected: tuple[float, float]
) -> None:
    q, z, steps, delta = params
    eps, order = rdp_to_epsilon(DEFAULT_ORDERS, compute_rdp(q, z, steps, DEFAULT_ORDERS), delta)
    assert eps == pytest.approx(expected[0], rel=1e-6)
    assert order == expected[1]


def test_accountant_with_changing_parameters_matches_opacus() -> None:
    # Opacus 1.6.0 RDPAccountant: 30 x step(noise_multiplier=1.0, sample_rate=0.2), then
    # 20 x step(noise_multiplier=2.0, sample_rate=1.0); get_privacy_spent(delta=1e-5).
    acct = RdpAccountant()
    for _ in range(30):
        acct.step(1.0, 0.2)
    acct.step(2.0, 1.0, steps=20)
    assert acct.history == ((1.0, 0.2, 30), (2.0, 1.0, 20))
    assert acct.privacy_spent(1e-5) == pytest.approx((15.693437167999901, 2.5), rel=1e-6)


def test_mnist_figure_with_the_classic_conversion() -> None:
    # Published figure, independent of Opacus: the TF Privacy MNIST tutorial reports epsilon = 3.01
    # for these parameters with Mironov 2017's conversion eps = rdp + log(1/delta) / (alpha - 1).
    rdp = compute_rdp(256 / 60000, 1.1, 60 * 60000 // 256, DEFAULT_ORDERS)
    classic = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip(DEFAULT_ORDERS, rdp))
    assert classic == pytest.approx(3.01, abs=0.01)
    # The improved conversion is never looser.
    assert rdp_to_epsilon(DEFAULT_ORDERS, rdp, 1e-5)[0] < classic


def test_full_participation_is_the_closed_form() -> None:
    orders = [1.5, 2.0, 7.3, 32.0]
    assert compute_rdp(1.0, 1.7, 9, orders) == pytest.approx([9 * a / (2 * 1.7**2) for a in orders])


def test_subsampling_only_helps_and_zero_rate_costs_nothing() -> None:
    full = compute_rdp(1.0, 1.0, 10, DEFAULT_ORDERS)
    sampled = compute_rdp(0.1, 1.0, 10, DEFAULT_ORDERS)
    assert all(s < f for s, f in zip(sampled, full))
    assert compute_rdp(0.0, 1.0, 10, DEFAULT_ORDERS) == [0.0] * len(DEFAULT_ORDERS)
    assert compute_rdp(0.3, 1.0, 0, DEFAULT_ORDERS) == [0.0] * len(DEFAULT_ORDERS)


def test_no_noise_means_no_privacy() -> None:
    acct = RdpAccountant()
    assert acct.epsilon(1e-5) == 0.0
    acct.step(0.0, 0.5)
    assert acct.epsilon(1e-5) == math.inf


def test_accountant_survives_json_round_trip() -> None:
    acct = RdpAccountant()
    acct.step(1.1, 0.05, steps=40)
    acct.step(0.9, 0.05)
    restored = RdpAccountant.from_dict(json.loads(json.dumps(acct.to_dict())))
    assert restored.history == acct.history
    assert restored.orders == acct.orders
    assert restored.epsilon(1e-5) == acct.epsilon(1e-5)
    # It keeps counting where it left off.
    restored.step(0.9, 0.05)
    assert restored.history[-1] == (0.9, 0.05, 2)


@pytest.mark.parametrize(
    "data",
    [
        {"format": "something-else", "orders": [2.0], "history": []},
        {"format": "fedtune.rdp-accountant/1", "orders": [2.0], "history": [{"steps": 1}]},
        {"format": "fedtune.rdp-accountant/1", "orders": [0.5], "history": []},
        {
            "format": "fedtune.rdp-accountant/1",
            "orders": [2.0],
            "history": [{"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}],
        },
    ],
)
def test_corrupt_saved_accountant_is_rejected(data: dict) -> None:
    with pytest.raises(InvalidInput):
        RdpAccountant.from_dict(data)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: compute_rdp(0.1, -1.0, 10, DEFAULT_ORDERS), "-1.0"),
        (lambda: compute_rdp(1.5, 1.0, 10, DEFAULT_ORDERS), "1.5"),
        (lambda: compute_rdp(-0.1, 1.0, 10, DEFAULT_ORDERS), "-0.1"),
        (lambda: compute_rdp(0.1, 1.0, -3, DEFAULT_ORDERS), "-3"),
        (lambda: compute_rdp(0.1, 1.0, 10, [1.0, 2.0]), "1.0"),
        (lambda: rdp_to_epsilon([2.0], [0.1], 0.0), "0.0"),
        (lambda: rdp_to_epsilon([2.0], [0.1], 1.0), "1.0"),
        (lambda: RdpAccountant().step(-0.5, 0.1), "-0.5"),
        (lambda: RdpAccountant().step(1.0, 2.0), "2.0"),
        (lambda: RdpAccountant().epsilon(1.5), "1.5"),
        (lambda: clip_update({"w": torch.ones(3)}, -1.0), "-1.0"),
        (lambda: clip_update({"w": torch.tensor([1.0, math.nan])}, 1.0), "nan"),
        (lambda: add_gaussian_noise({"w": torch.ones(3)}, -2.0, 1.0, None), "-2.0"),
        (lambda: add_gaussian_noise({"w": torch.ones(3)}, 1.0, 0.0, None), "0.0"),
    ],
)
def test_bad_inputs_name_the_value(call: Callable[[], object], needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle.replace(".", r"\.")):
        call()


def test_clipping_bounds_the_global_norm_and_keeps_direction() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {
        "a.lora_A.weight": 3 * torch.randn(4, 16, generator=g),
        "a.lora_B.weight": torch.randn(16, 4, generator=g),
    }
    before = global_l2_norm(delta)
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(before)
    assert global_l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    for k, v in delta.items():
        torch.testing.assert_close(clipped[k], v / before)


def test_small_update_is_left_unchanged() -> None:
    delta = {"w": torch.full((10,), 0.01), "b": torch.zeros(3)}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(math.sqrt(10) * 0.01)
    for k, v in delta.items():
        assert torch.equal(clipped[k], v)


def test_noise_has_the_calibrated_std() -> None:
    summed = {"big": torch.zeros(200_000), "small": torch.zeros(3, dtype=torch.bfloat16)}
    noised = add_gaussian_noise(
        summed, noise_multiplier=1.5, max_norm=0.4, generator=torch.Generator().manual_seed(1)
    )
    sample = noised["big"]
    # std 0.6 from 200k samples: the estimate's own std is about 0.6 / sqrt(4e5) ~ 1e-3.
    assert sample.std().item() == pytest.approx(0.6, rel=0.01)
    assert abs(sample.mean().item()) < 0.01
    assert noised["small"].dtype == torch.bfloat16
    assert torch.equal(summed["big"], torch.zeros(200_000))  # the input is not modified


def test_noise_is_reproducible_whatever_the_key_order() -> None:
    a = {"x": torch.zeros(5), "y": torch.zeros(5)}
    b = {"y": torch.zeros(5), "x": torch.zeros(5)}
    na = add_gaussian_noise(a, 1.0, 1.0, torch.Generator().manual_seed(3))
    nb = add_gaussian_noise(b, 1.0, 1.0, torch.Generator().manual_seed(3))
    for k in a:
        assert torch.equal(na[k], nb[k])
