"""LoRA-aware aggregation: exact product mean, SVD refactoring, rank padding and truncation."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.errors import InvalidInput
from fedtune.methods.lora_aggregation import (
    exact_aggregate,
    factor_mean,
    lora_pairs,
    pad_rank,
    product_mean,
    rank_of_pairs,
    refactor,
    split_ab,
    state_rank,
    truncate_rank,
    truncation_error,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
# (out, in) of the two synthetic modules: not square, so transposes would show.
SHAPES = {Q: (12, 10), V: (6, 10)}


def client(seed: int, rank: int, *, magnitude: bool = False) -> dict[str, torch.Tensor]:
    """A synthetic adapter state with two LoRA modules at ``rank``."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module, (out_f, in_f) in SHAPES.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen)
        state[f"{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
        if magnitude:
            state[f"{module}.lora_magnitude_vector"] = torch.rand(out_f, generator=gen) + 0.5
    return state


def manual_mean_product(states, weights, module, scales=None):
    scales = scales or [1.0] * len(states)
    total = sum(w * s * (st[f"{module}.lora_B.weight"].double() @ st[f"{module}.lora_A.weight"].double())
                for st, w, s in zip(states, weights, scales))
    return total / sum(weights)


def product(state, module, a="lora_A.weight", b="lora_B.weight"):
    return state[f"{module}.{b}"].double() @ state[f"{module}.{a}"].double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


STATES = [client(1, 4), client(2, 4), client(3, 4)]
WEIGHTS = [5.0, 1.0, 2.5]


def test_product_mean_matches_hand_computation():
    got = product_mean(STATES, WEIGHTS)
    assert set(got) == {Q, V}
    for module in (Q, V):
        assert got[module].dtype == torch.float64
        assert got[module].shape == SHAPES[module]
        assert torch.allclose(got[module], manual_mean_product(STATES, WEIGHTS, module), atol=1e-6, rtol=0)


def test_product_mean_applies_scales():
    scales = [1.0, 0.5, 2.0]
    got = product_mean(STATES, WEIGHTS, scales)
    assert torch.allclose(got[Q], manual_mean_product(STATES, WEIGHTS, Q, scales), atol=1e-6, rtol=0)


def test_exact_aggregate_at_full_rank_is_exact():
    rank = 3 * 4  # the sum of the client ranks: the mean product has at most that rank
    state, error = exact_aggregate(STATES, WEIGHTS, rank)
    assert list(state) == list(STATES[0])
    assert error == pytest.approx(0.0, abs=1e-6)
    for module in (Q, V):
        assert state[f"{module}.lora_A.weight"].dtype == torch.float32
        assert state[f"{module}.lora_A.weight"].shape == (rank, SHAPES[module][1])
        assert state[f"{module}.lora_B.weight"].shape == (SHAPES[module][0], rank)
        expected = manual_mean_product(STATES, WEIGHTS, module)
        assert torch.allclose(product(state, module), expected, atol=1e-5, rtol=0)


def test_low_rank_error_is_the_discarded_singular_values_and_optimal():
    k = 3
    products = product_mean(STATES, WEIGHTS)
    factors, errors = refactor(products, k, lora_pairs(STATES[0]))
    for module in (Q, V):
        delta = products[module]
        s = torch.linalg.svdvals(delta)
        expected = float(torch.linalg.vector_norm(s[k:]) / torch.linalg.vector_norm(s))
        assert errors[module] == pytest.approx(expected, rel=1e-9)
        approx = product(factors, module)
        # Eckart-Young: no rank-k matrix gets closer than the discarded singular values.
        assert rel(approx, delta) == pytest.approx(expected, rel=1e-5)
        u, sv, vh = torch.linalg.svd(delta)
        best = u[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
        assert torch.allclose(approx, best, atol=1e-5, rtol=0)
        # Balanced split: B and A carry the same Frobenius norm (sqrt S on each side).
        a, b = factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"]
        assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-5)
    norms = {m: float(products[m].norm()) for m in (Q, V)}
    overall = math.sqrt(sum((errors[m] * norms[m]) ** 2 for m in norms) / sum(n**2 for n in norms.values()))
    assert truncation_error(errors, products) == pytest.approx(overall, rel=1e-12)
    _, via_aggregate = exact_aggregate(STATES, WEIGHTS, k)
    assert via_aggregate == pytest.approx(overall, rel=1e-9)


def test_factor_mean_is_not_the_mean_update_but_exact_is():
    exact_mean = {m: manual_mean_product(STATES, WEIGHTS, m) for m in (Q, V)}
    averaged = factor_mean(STATES, WEIGHTS, rank=4)
    exact, _ = exact_aggregate(STATES, WEIGHTS, rank=12)
    for module in (Q, V):
        assert rel(product(averaged, module), exact_mean[module]) > 0.1
        assert rel(product(exact, module), exact_mean[module]) < 1e-5


def test_heterogeneous_ranks_exact_and_factor_mean_pads():
    states = [client(10, 2), client(11, 4), client(12, 8)]
    weights = [1.0, 2.0, 3.0]
    assert [state_rank(s) for s in states] == [2, 4, 8]
    exact, error = exact_aggregate(states, weights, rank=14)
    assert error == pytest.approx(0.0, abs=1e-6)
    for module in (Q, V):
        assert torch.allclose(product(exact, module), manual_mean_product(states, weights, module), atol=1e-5)
    _, low_error = exact_aggregate(states, weights, rank=4)
    assert 0.0 < low_error < 1.0

    averaged = factor_mean(states, weights, rank=8)
    assert state_rank(averaged) == 8
    total = sum(weights)
    for module in (Q, V):
        a = averaged[f"{module}.lora_A.weight"]
        b = averaged[f"{module}.lora_B.weight"]
        # Rows 4..8 of A come from the rank-8 client alone (the others are zero-padded there).
        assert torch.allclose(a[4:], states[2][f"{module}.lora_A.weight"][4:] * 3.0 / total, atol=1e-6)
        expected_a = sum(w * pad_rank(s, 8)[f"{module}.lora_A.weight"] for s, w in zip(states, weights)) / total
        expected_b = sum(w * pad_rank(s, 8)[f"{module}.lora_B.weight"] for s, w in zip(states, weights)) / total
        assert torch.allclose(a, expected_a, atol=1e-6)
        assert torch.allclose(b, expected_b, atol=1e-6)
    with pytest.raises(InvalidInput, match="smaller rank 4"):
        factor_mean(states, weights, rank=4)


def test_truncating_a_refactored_state_is_the_best_approximation():
    products = product_mean(STATES, WEIGHTS)
    factors, _ = refactor(products, 8)
    for k in (1, 3, 5):
        truncated = truncate_rank(factors, k)
        direct, _ = refactor(products, k)
        assert state_rank(truncated) == k
        for module in (Q, V):
            assert torch.allclose(product(truncated, module), product(direct, module), atol=1e-5)


def test_pad_then_truncate_round_trips_and_keeps_the_product():
    state = client(4, 3, magnitude=True)
    padded = pad_rank(state, 7)
    assert rank_of_pairs(padded) == {Q: 7, V: 7}
    assert padded[f"{Q}.lora_magnitude_vector"] is state[f"{Q}.lora_magnitude_vector"]
    assert torch.equal(product(padded, Q), product(state, Q))
    back = truncate_rank(padded, 3)
    assert all(torch.equal(back[key], state[key]) for key in state)
    assert back[f"{Q}.lora_B.weight"].is_contiguous()


def test_pad_and_truncate_reject_the_wrong_direction():
    state = client(5, 4)
    with pytest.raises(InvalidInput, match="smaller rank 2"):
        pad_rank(state, 2)
    with pytest.raises(InvalidInput, match="larger rank 6"):
        truncate_rank(state, 6)
    with pytest.raises(InvalidInput, match="at least 1"):
        truncate_rank(state, 0)
    assert pad_rank(state, 4)[f"{Q}.lora_A.weight"].shape == (4, 10)


def test_refactor_zero_pads_above_the_matrix_rank_and_handles_zero():
    delta = torch.randn(6, 10, dtype=torch.float64)
    factors, errors = refactor({V: delta, Q: torch.zeros(12, 10)}, rank=9)
    assert factors[f"{V}.lora_A.weight"].shape == (9, 10)
    assert factors[f"{V}.lora_B.weight"].shape == (6, 9)
    assert torch.count_nonzero(factors[f"{V}.lora_A.weight"][6:]) == 0
    assert torch.count_nonzero(factors[f"{V}.lora_B.weight"][:, 6:]) == 0
    assert torch.allclose(product(factors, V), delta, atol=1e-5)
    assert errors == {V: 0.0, Q: 0.0}
    assert torch.count_nonzero(factors[f"{Q}.lora_B.weight"]) == 0
    with pytest.raises(InvalidInput, match="at least 1"):
        refactor({V: delta}, rank=0)
    with pytest.raises(InvalidInput, match="not finite"):
        refactor({V: torch.full((2, 2), float("nan"))}, rank=1)


def test_unpaired_and_mismatched_keys_are_rejected():
    state = client(6, 4)
    no_b = {k: v for k, v in state.items() if k != f"{V}.lora_B.weight"}
    with pytest.raises(InvalidInput, match=f"{V}.*no lora_B"):
        lora_pairs(no_b)
    no_a = {k: v for k, v in state.items() if k != f"{Q}.lora_A.weight"}
    with pytest.raises(InvalidInput, match=f"{Q}.*no lora_A"):
        lora_pairs(no_a)
    with pytest.raises(InvalidInput, match=V):
        exact_aggregate([state, no_b], [1, 1], 4)

    mixed = dict(state)
    mixed[f"{V}.lora_A.weight"] = torch.randn(2, 10)
    mixed[f"{V}.lora_B.weight"] = torch.randn(6, 2)
    with pytest.raises(InvalidInput, match=f"{V}.*rank 2.*{Q}.*rank 4"):
        state_rank(mixed)
    assert rank_of_pairs(mixed) == {Q: 4, V: 2}

    broken = dict(state)
    broken[f"{Q}.lora_B.weight"] = torch.randn(12, 3)
    with pytest.raises(InvalidInput, match=f"{Q}.*4 rows.*3 columns"):
        rank_of_pairs(broken)

    other_shape = client(7, 4)
    other_shape[f"{Q}.lora_A.weight"] = torch.randn(4, 11)
    with pytest.raises(InvalidInput, match=f"{Q}.*client 1"):
        product_mean([state, other_shape], [1, 1])

    with pytest.raises(InvalidInput, match="no LoRA"):
        state_rank({"bias": torch.zeros(3)})


@pytest.mark.parametrize(("weights", "match"), [([1, 2], "3 states but 2 weights"), ([1, -1, 1], "weight 1"),
                                                 ([0, 0, 0], "sum to 0"), ([1, float("nan"), 1], "weight 1")])
def test_bad_weights(weights, match):
    with pytest.raises(InvalidInput, match=match):
        exact_aggregate(STATES, weights, 4)


def test_embedding_style_keys():
    emb = "base_model.model.model.embed_tokens"
    gen = torch.Generator().manual_seed(8)
    states = [{f"{emb}.lora_embedding_A": torch.randn(4, 64, generator=gen),
               f"{emb}.lora_embedding_B": torch.randn(32, 4, generator=gen),
               f"{Q}.lora_A.weight": torch.randn(4, 10, generator=gen),
               f"{Q}.lora_B.weight": torch.randn(12, 4, generator=gen)} for _ in range(2)]
    assert lora_pairs(states[0]) == {emb: (f"{emb}.lora_embedding_A", f"{emb}.lora_embedding_B"),
                                     Q: (f"{Q}.lora_A.weight", f"{Q}.lora_B.weight")}
    state, error = exact_aggregate(states, [1.0, 3.0], rank=8)
    assert set(state) == set(states[0])
    assert error == pytest.approx(0.0, abs=1e-6)
    expected = sum(w * (s[f"{emb}.lora_embedding_B"].double() @ s[f"{emb}.lora_embedding_A"].double())
                   for s, w in zip(states, [1.0, 3.0])) / 4.0
    got = product(state, emb, a="lora_embedding_A", b="lora_embedding_B")
    assert torch.allclose(got, expected, atol=1e-5)
    assert state_rank(truncate_rank(state, 2)) == 2
    with pytest.raises(InvalidInput, match="mixes"):
        lora_pairs([f"{emb}.lora_embedding_A", f"{emb}.lora_B.weight"])


def test_plain_tensors_are_the_weighted_mean():
    states = [client(20, 4, magnitude=True), client(21, 2, magnitude=True)]
    for s, value in zip(states, (1.0, 4.0)):
        s["base_model.model.lm_head.modules_to_save.weight"] = torch.full((3, 2), value, dtype=torch.bfloat16)
    state, _ = exact_aggregate(states, [3.0, 1.0], rank=4, scales=[1.0, 2.0])
    head = state["base_model.model.lm_head.modules_to_save.weight"]
    assert head.dtype == torch.bfloat16
    assert torch.all(head == 1.75)  # (3·1 + 1·4) / 4; the scales do not touch plain tensors
    mag = f"{Q}.lora_magnitude_vector"
    assert torch.allclose(state[mag], (3 * states[0][mag] + states[1][mag]) / 4, atol=1e-6)
    lora_only, _ = exact_aggregate(states, [3.0, 1.0], rank=4, plain_keys_mean=False)
    assert set(lora_only) == set(lora_pairs(states[0])[Q]) | set(lora_pairs(states[0])[V])
    with pytest.raises(InvalidInput, match="lacks"):
        exact_aggregate([states[0], client(22, 4)], [1, 1], 4)


def test_split_ab_separates_factors_from_plain_tensors():
    state = client(30, 4, magnitude=True)
    a_part, b_part, plain = split_ab(state)
    assert set(a_part) == {f"{Q}.lora_A.weight", f"{V}.lora_A.weight"}
    assert set(b_part) == {f"{Q}.lora_B.weight", f"{V}.lora_B.weight"}
    assert set(plain) == {f"{Q}.lora_magnitude_vector", f"{V}.lora_magnitude_vector"}


def test_real_peft_dora_and_embedding_keys():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    saved = peft.get_peft_model_state_dict(model)
    pairs = lora_pairs(saved)
    targets = {name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    assert set(pairs) == targets and len(pairs) == 4
    assert {k for pair in pairs.values() for k in pair} == {k for k in saved if ".lora_A." in k or ".lora_B." in k}
    magnitudes = [k for k in saved if "magnitude" in k]
    assert sorted(magnitudes) == sorted(f"{m}.lora_magnitude_vector" for m in targets)
    _, _, plain = split_ab(saved)
    assert set(plain) == set(magnitudes)
    assert state_rank(saved) == 4

    # Clients with perturbed copies: the result has peft's keys and shapes, so it loads back.
    states = [{k: v + 0.01 * i * torch.randn_like(v) for k, v in saved.items()} for i in range(1, 4)]
    for s in states:  # peft inits B at 0; make the products non-trivial
        for _, b in pairs.values():
            s[b] = torch.randn_like(s[b])
    state, _ = exact_aggregate(states, [1, 2, 3], rank=4)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in saved.items()}
    peft.set_peft_model_state_dict(model, state)

    emb_model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                    peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    emb_saved = peft.get_peft_model_state_dict(emb_model, save_embedding_layers=False)
    emb_pairs = lora_pairs(emb_saved)
    assert emb_pairs["base_model.model.model.embed_tokens"] == (
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B")
    assert len(emb_pairs) == 3
    assert rank_of_pairs(emb_saved) == dict.fromkeys(emb_pairs, 4)


def test_round_product_error_from_factors_equals_the_product_formula():
    """The round's ``lora_product_error`` is computed from Gram matrices of the factors; it must be
    ‖mean(B·A) − B'·A'‖ / ‖mean(B·A)‖ as the products give it, at mixed client ranks too."""
    from fedtune.coordinator.compute import product_error

    states = [client(1, 4), client(2, 2), client(3, 6)]
    weights = [5, 1, 3]
    for new in (client(9, 4), client(8, 3)):
        num = sum(float((manual_mean_product(states, weights, m) - product(new, m)).pow(2).sum()) for m in SHAPES)
        den = sum(float(manual_mean_product(states, weights, m).pow(2).sum()) for m in SHAPES)
        for via in ("auto", "gram", "product"):  # many clients form the product once instead of the Grams
            assert product_error(states, weights, new, via=via) == pytest.approx((num / den) ** 0.5, rel=1e-9)
    same = [client(4, 3)] * 3
    assert product_error(same, [1, 1, 1], same[0]) < 1e-7  # the mean is exactly representable
    assert product_error(same, [1, 1, 1], same[0], via="gram") < 1e-7
