"""Aggregation strategies against their papers' formulas, on fixed vectors and over several rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtune.coordinator.compute import next_global
from fedtune.errors import InvalidInput
from fedtune.peft_io import bytes_to_tensors, tensors_to_bytes
from fedtune.strategies import STRATEGIES, WeightedDelta, get_strategy, strategy_list
from fedtune.strategies.base import RoundContext, StrategyRun

CTX = RoundContext(round=1, enrolled=4)


def _ups(rows: list[list[float]], examples: list[int] | None = None) -> list[WeightedDelta]:
    return [WeightedDelta({"w": torch.tensor(r, dtype=torch.float32)}, (examples or [1] * len(rows))[i])
            for i, r in enumerate(rows)]


def _rounds(name: str, options: dict, means: list[np.ndarray]) -> list[np.ndarray]:
    """The steps the strategy adds to the global adapter for a sequence of round means."""
    unit = get_strategy(name, options)
    state: dict[str, torch.Tensor] = {}
    steps = []
    for r, m in enumerate(means, start=1):
        step, state = unit.server_step({"w": torch.tensor(m, dtype=torch.float32)}, state, RoundContext(r, 4), [])
        steps.append(step["w"].double().numpy())
    return steps


MEANS = [np.array([0.1, -0.2, 0.0, 0.5]), np.array([0.05, 0.1, -0.3, 0.5]), np.array([-0.2, 0.1, 0.1, 0.4])]


def test_every_registered_strategy_is_listed_and_tested_here() -> None:
    listed = {line.split()[0] for line in strategy_list().splitlines()}
    assert listed == set(STRATEGIES) == {
        "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
        "multikrum", "bulyan", "fedprox", "scaffold"}


def test_fedavg_is_the_example_weighted_mean_added_as_is() -> None:
    out = get_strategy("fedavg").combine(_ups([[1, 0], [0, 1], [3, 3]], [1, 1, 2]))
    assert torch.allclose(out["w"], torch.tensor([1.75, 1.75]))
    assert _rounds("fedavg", {}, MEANS)[1] == pytest.approx(MEANS[1])


def test_fedavgm_accumulates_server_momentum() -> None:
    lr, beta = 0.5, 0.8
    m = np.zeros(4)
    expected = []
    for d in MEANS:
        m = beta * m + d
        expected.append(lr * m)
    for got, want in zip(_rounds("fedavgm", {"server_lr": lr, "momentum": beta}, MEANS), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_follow_reddi_et_al_algorithm_2(name: str) -> None:
    eta, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3
    opts = {"server_lr": eta, "beta1": b1, "tau": tau} | ({} if name == "fedadagrad" else {"beta2": b2})
    m, v = np.zeros(4), np.full(4, tau**2)
    expected = []
    for d in MEANS:
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d**2
        elif name == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        expected.append(eta * m / (np.sqrt(v) + tau))
    got = _rounds(name, opts, MEANS)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-8)
    # The three differ from round 2 on (their second moments do), and from FedAvg from the first.
    assert not np.allclose(got[0], MEANS[0])


def test_fedadagrad_has_no_beta2() -> None:
    with pytest.raises(InvalidInput, match="aggregation.options.beta2: unknown option for strategy fedadagrad"):
        get_strategy("fedadagrad", {"beta2": 0.9})


def test_fedmedian_is_the_coordinate_median_unweighted() -> None:
    odd = get_strategy("fedmedian").combine(_ups([[1, 9], [2, -5], [100, 0]], [1, 1, 50]))
    assert odd["w"].tolist() == [2, 0]
    even = get_strategy("fedmedian").combine(_ups([[1], [2], [4], [100]]))
    assert even["w"].tolist() == [3]


def test_fedtrimmedavg_cuts_beta_of_each_end() -> None:
    rows = [[v] for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1000.0)]
    out = get_strategy("fedtrimmedavg", {"beta": 0.2}).combine(_ups(rows))
    assert out["w"].item() == pytest.approx(np.mean([2, 3, 4, 5, 6, 7]))
    assert get_strategy("fedtrimmedavg", {"beta": 0.0}).combine(_ups(rows))["w"].item() == pytest.approx(103.6)


def _krum_reference(vectors: np.ndarray, f: int) -> list[float]:
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return scores


def test_krum_and_multikrum_pick_by_the_papers_score() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 0.1, size=(6, 5))
    attackers = np.array([np.full(5, 4.0), -honest[0] * 20])
    vectors = np.vstack([honest, attackers])
    ups = _ups(vectors.tolist(), [10, 20, 30, 40, 50, 60, 70, 80])
    scores = _krum_reference(vectors, 2)
    best = int(np.argmin(scores))
    krum = get_strategy("krum", {"byzantine": 2}).combine(ups)
    assert krum["w"].double().numpy() == pytest.approx(vectors[best], abs=1e-6)
    assert best < 6
    keep = np.argsort(scores, kind="stable")[:4]
    weights = np.array([10, 20, 30, 40, 50, 60, 70, 80])[keep]
    want = (vectors[keep] * weights[:, None]).sum(0) / weights.sum()
    multi = get_strategy("multikrum", {"byzantine": 2, "keep": 4}).combine(ups)
    assert multi["w"].double().numpy() == pytest.approx(want, abs=1e-6)
    assert set(keep) <= set(range(6))  # no attacker is kept


def test_krum_refuses_a_round_too_small_for_its_byzantine_bound() -> None:
    with pytest.raises(InvalidInput, match=r"needs more than 6 updates \(n > 2f \+ 2\); the round has 6"):
        get_strategy("krum", {"byzantine": 2}).combine(_ups([[float(i)] for i in range(6)]))


def test_bulyan_selects_by_iterated_krum_then_trims_around_the_median() -> None:
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 0.1, size=(6, 3))
    vectors = np.vstack([honest, np.full((1, 3), 50.0)])  # n = 7 = 4f + 3 with f = 1
    out = get_strategy("bulyan", {"byzantine": 1}).combine(_ups(vectors.tolist()))["w"].double().numpy()
    # Reference: θ = n - 2f = 5 picked by iterated Krum; per coordinate the β = θ - 2f = 3 nearest the median.
    pool, picked = list(range(7)), []
    while len(picked) < 5:
        scores = []
        for i in pool:
            d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in pool if j != i)
            scores.append(sum(d[: max(1, len(pool) - 1 - 2)]))
        pick = pool[int(np.argmin(scores))]
        picked.append(pick)
        pool.remove(pick)
    assert 6 not in picked
    sel = vectors[sorted(picked)]
    want = []
    for c in range(3):
        col = sel[:, c]
        med = np.median(col)
        want.append(np.mean(col[np.argsort(np.abs(col - med), kind="stable")[:3]]))
    assert out == pytest.approx(np.array(want), abs=1e-6)
    with pytest.raises(InvalidInput, match=r"n >= 4f \+ 3"):
        get_strategy("bulyan", {"byzantine": 2}).combine(_ups(vectors.tolist()))


def test_scaffold_moves_the_server_variate_by_the_participating_share() -> None:
    ups = [WeightedDelta({"w": torch.tensor([1.0, 2.0])}, 1, {"w": torch.tensor([0.5, -1.0])}),
           WeightedDelta({"w": torch.tensor([3.0, 0.0])}, 3, {"w": torch.tensor([1.5, 1.0])})]
    unit = get_strategy("scaffold", {"server_lr": 0.5})
    mean = unit.combine(ups)
    step, state = unit.server_step(mean, {"c/w": torch.tensor([1.0, 1.0], dtype=torch.float64)},
                                   RoundContext(2, enrolled=8), ups)
    assert step["w"].tolist() == pytest.approx([0.5 * 2.5, 0.5 * 0.5])
    assert state["c/w"].tolist() == pytest.approx([1.0 + 2 / 8 * 1.0, 1.0 + 2 / 8 * 0.0])
    with pytest.raises(InvalidInput, match="no control variate"):
        unit.server_step(mean, {}, CTX, [WeightedDelta({"w": torch.tensor([1.0, 2.0])}, 1)])


def test_next_global_carries_the_strategy_state_across_rounds() -> None:
    """Through the coordinator's aggregation: the state a round returns, fed to the next, gives
    the same adapter as the formula; fedavg keeps none."""
    global_blob = tensors_to_bytes({"w": torch.zeros(4)})
    state = None
    m, v = np.zeros(4), np.full(4, 1e-6)
    x = np.zeros(4)
    for r, d in enumerate(MEANS, start=1):
        plains = [tensors_to_bytes({"w": torch.tensor(d, dtype=torch.float32) * k}) for k in (0.5, 1.5)]
        run = StrategyRun("fedadam", {"server_lr": 0.1, "tau": 1e-3}, state, r, 2)
        global_blob, state = next_global(global_blob, plains, [1, 1], "fp32", {"w": (4,)}, run, None)
        assert state is not None and set(bytes_to_tensors(state)) == {"m/w", "v/w"}
        m = 0.9 * m + 0.1 * d
        v = 0.99 * v + 0.01 * d**2
        x = x + 0.1 * m / (np.sqrt(v) + 1e-3)
    assert bytes_to_tensors(global_blob)["w"].double().numpy() == pytest.approx(x, rel=1e-5)
    _, none = next_global(global_blob, plains, [1, 1], "fp32", {"w": (4,)}, StrategyRun(), None)
    assert none is None


def test_staleness_weights_scale_async_updates() -> None:
    plains = [tensors_to_bytes({"w": torch.tensor([1.0])}), tensors_to_bytes({"w": torch.tensor([1.0])})]
    run = StrategyRun(staleness=(0, 3), staleness_exponent=0.5)
    blob, _ = next_global(tensors_to_bytes({"w": torch.zeros(1)}), plains, [1, 1], "fp32", {"w": (1,)}, run, None)
    assert bytes_to_tensors(blob)["w"].item() == pytest.approx((1.0 + 1 / math.sqrt(4)) / 2)


def _federate(strategy: str, options: dict, attackers: int, model, data, held_out, pad: int,  # type: ignore[no-untyped-def]
              rounds: int = 3) -> float:
    """Rounds of real local training (train_adapter) and the coordinator's aggregation (next_global);
    the last ``attackers`` clients send their delta sign-flipped and scaled by 8. Returns the eval loss."""
    from fedtune.peft_io import adapter_state, load_adapter_state
    from fedtune.training import evaluate_loss, train_adapter

    cpu = torch.device("cpu")
    load_adapter_state(model, {k: v for k, v in _INITIAL.items()})
    global_blob = tensors_to_bytes(adapter_state(model))
    schema = {k: tuple(v.shape) for k, v in _INITIAL.items()}
    state = None
    for r in range(1, rounds + 1):
        start = bytes_to_tensors(global_blob)
        plains = []
        for i, client in enumerate(data):
            load_adapter_state(model, start)
            train_adapter(model, client, pad_id=pad, lr=0.01, batch_size=8, steps=6, epochs=None, seed=r * 100 + i,
                          device=cpu, progress=False)
            end = adapter_state(model)
            scale = -8.0 if i >= len(data) - attackers else 1.0
            plains.append(tensors_to_bytes({k: scale * (end[k] - start[k]) for k in start}))
        run = StrategyRun(strategy, options, state, r, len(data))
        global_blob, state = next_global(global_blob, plains, [len(c) for c in data], "fp32", schema, run, None)
    load_adapter_state(model, bytes_to_tensors(global_blob))
    return evaluate_loss(model, held_out, pad_id=pad, batch_size=16, device=cpu)


_INITIAL: dict[str, torch.Tensor] = {}


def test_robust_aggregators_hold_against_two_of_eight_attackers_where_fedavg_does_not(  # type: ignore[no-untyped-def]
        tmp_path_factory, one_thread) -> None:
    from fedtune.data import load_jsonl, tokenize, write_synthetic_federation
    from fedtune.methods import config_for
    from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
    from fedtune.peft_io import adapter_state, build_peft_model

    preset = materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))
    tok = load_tokenizer(preset)
    files, eval_path = write_synthetic_federation(tmp_path_factory.mktemp("data"), 8, examples_per_client=16,
                                                  eval_examples=32)
    data = [tokenize(load_jsonl(p), tok, 48) for p in files]
    held_out = tokenize(load_jsonl(eval_path), tok, 48)
    model = build_peft_model(load_causal_lm(preset, torch.device("cpu")), seed=0, config=config_for(
        {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    _INITIAL.update(adapter_state(model))
    pad = tok.pad_token_id
    clean = _federate("fedavg", {}, 0, model, data, held_out, pad)
    attacked = {name: _federate(name, opts, 2, model, data, held_out, pad) for name, opts in [
        ("fedavg", {}), ("multikrum", {"byzantine": 2}), ("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.25})]}
    for name in ("multikrum", "fedmedian", "fedtrimmedavg"):
        assert attacked[name] <= clean * 1.05, (name, attacked[name], clean)
        assert attacked[name] < attacked["fedavg"], (name, attacked)
    assert attacked["fedavg"] > clean * 1.05, attacked
