"""Batched multi-adapter training and evaluation against isolated peft runs on the tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model_state_dict

from fedtune.batching import (
    AdapterSpec,
    MultiLoraModel,
    TrainingPlan,
    evaluate_losses,
    train_adapters,
    train_batched,
)
from fedtune.data import IGNORE_INDEX, collate, load_jsonl, tokenize, write_synthetic_federation
from fedtune.errors import InvalidInput
from fedtune.models import TINY_PRESET, load_causal_lm, load_tokenizer, materialize_preset
from fedtune.peft_io import adapter_state, build_peft_model, load_adapter_state, lora_config, save_adapter_dir
from fedtune.training import Recipe, evaluate_loss, train_adapter

CPU = torch.device("cpu")
BASE = "tiny-llama@test"
# Three adapters that differ in rank, alpha and target modules (two overlap on q_proj).
CONFIGS = [
    {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "alpha": 32, "target_modules": ["q_proj", "o_proj", "lm_head"]},
    {"r": 2, "alpha": 3, "target_modules": ["k_proj", "down_proj"]},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(preset dir, pad id, one tokenized training set per adapter, held-out set)."""
    preset = materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))
    tokenizer = load_tokenizer(preset)
    clients, eval_path = write_synthetic_federation(tmp_path_factory.mktemp("data"), 3, examples_per_client=24,
                                                    eval_examples=20)
    # Different max lengths, so isolated batches are padded to other widths than the shared one.
    train = [tokenize(load_jsonl(p), tokenizer, max_seq_len=n) for p, n in zip(clients, (24, 48, 64), strict=True)]
    held_out = tokenize(load_jsonl(eval_path), tokenizer, max_seq_len=64)
    return preset, tokenizer.pad_token_id, train, held_out


def _isolated(preset: Path, k: int, state: dict[str, torch.Tensor] | None = None) -> PeftModel:
    model = build_peft_model(load_causal_lm(preset, CPU), dropout=0.0, seed=k, **CONFIGS[k])  # type: ignore[arg-type]
    if state is not None:
        load_adapter_state(model, state)
    return model


def _config(k: int, dropout: float = 0.0):  # type: ignore[no-untyped-def]
    c = CONFIGS[k]
    return lora_config(c["r"], c["alpha"], dropout, c["target_modules"])  # type: ignore[arg-type]


def _random_states(preset: Path) -> list[dict[str, torch.Tensor]]:
    """Starting weights with non-zero B, so every LoRA matrix gets a gradient."""
    gen = torch.Generator().manual_seed(7)
    states = []
    for k in range(len(CONFIGS)):
        state = adapter_state(_isolated(preset, k))
        states.append({name: 0.05 * torch.randn(v.shape, generator=gen) for name, v in state.items()})
    return states


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _isolated_gradients(model: PeftModel, batch: list[dict[str, list[int]]], pad_id: int
                        ) -> tuple[float, dict[str, torch.Tensor]]:
    """Token-mean loss of one isolated batch, written out here, and its gradients under peft's keys."""
    model.train()
    tensors = collate(batch, pad_id)
    logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tensors["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), get_peft_model_state_dict(model, state_dict=grads, save_embedding_layers=False)


def test_per_adapter_gradients_match_isolated_training(setup) -> None:
    preset, pad_id, train, _ = setup
    states = _random_states(preset)
    model = MultiLoraModel(load_causal_lm(preset, CPU), BASE,
                           [AdapterSpec(BASE, _config(k), state=states[k]) for k in range(3)])
    batches = [train[k][: 3 + 2 * k] for k in range(3)]  # segments of 3, 5 and 7 samples
    model.train()
    sums = model.token_loss_sums(list(enumerate(batches)), pad_id, CPU)
    torch.stack([loss / n for loss, n in sums]).sum().backward()

    for k in range(3):
        loss, expected = _isolated_gradients(_isolated(preset, k, states[k]), batches[k], pad_id)
        got = model.gradients(k)
        assert got.keys() == expected.keys() == states[k].keys()
        for name, grad in expected.items():
            assert grad.norm() > 0, name
            assert _rel(got[name], grad) < 1e-5, (k, name, _rel(got[name], grad))
        assert sums[k][0].item() / sums[k][1] == pytest.approx(loss, rel=1e-5)


def test_batched_training_gives_the_weights_of_sequential_runs(setup, tmp_path: Path) -> None:
    preset, pad_id, train, held_out = setup
    # Different learning rates, batch sizes, seeds and step counts (adapters leave when done).
    # One follows a recipe of its own (round 2 of a cosine schedule with warmup, no decay, tighter clip).
    recipe = Recipe(lr_scheduler="cosine", warmup_steps=2, weight_decay=0.0, max_grad_norm=0.5, first_step=3,
                    total_steps=9)
    plans = [TrainingPlan(train[0], lr=5e-3, batch_size=4, steps=5, seed=1),
             TrainingPlan(train[1], lr=1e-2, batch_size=6, steps=3, seed=2, recipe=recipe),
             TrainingPlan(train[2], lr=2e-3, batch_size=5, epochs=1.0, seed=3)]
    specs = [AdapterSpec(BASE, _config(k), init_seed=k) for k in range(3)]

    runs = train_batched(load_causal_lm(preset, CPU), BASE, specs, plans, pad_id=pad_id, device=CPU)

    for k, (plan, run) in enumerate(zip(plans, runs, strict=True)):
        isolated = _isolated(preset, k)
        expected = train_adapter(isolated, plan.examples, pad_id=pad_id, lr=plan.lr, batch_size=plan.batch_size,
                                 steps=plan.steps, epochs=plan.epochs, seed=plan.seed, device=CPU, progress=False,
                                 recipe=plan.recipe)
        assert run.result.steps == expected.steps and run.result.num_examples == expected.num_examples
        assert run.result.mean_loss == pytest.approx(expected.mean_loss, rel=1e-5)
        assert run.result.final_loss == pytest.approx(expected.final_loss, rel=1e-5)
        trained = adapter_state(isolated)
        assert run.state.keys() == trained.keys()
        for name, value in trained.items():
            torch.testing.assert_close(run.state[name], value, rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(run.state[n], v) for n, v in adapter_state(_isolated(preset, k)).items())

        # The returned state is an ordinary adapter: it loads into plain peft and publishes as usual.
        plain = _isolated(preset, k)
        load_adapter_state(plain, run.state)
        published = save_adapter_dir(_config(k), run.state, tmp_path / f"adapter{k}", "tiny-llama")
        loaded = PeftModel.from_pretrained(load_causal_lm(preset, CPU), str(published))
        loss_plain = evaluate_loss(plain, held_out, pad_id=pad_id, batch_size=16, device=CPU)
        loss_loaded = evaluate_loss(loaded, held_out, pad_id=pad_id, batch_size=16, device=CPU)
        assert loss_loaded == pytest.approx(loss_plain, rel=1e-6)
        assert loss_plain == pytest.approx(
            evaluate_loss(isolated, held_out, pad_id=pad_id, batch_size=16, device=CPU), rel=1e-4)


def test_batched_evaluation_matches_isolated(setup) -> None:
    preset, pad_id, train, held_out = setup
    states = _random_states(preset)
    model = MultiLoraModel(load_causal_lm(preset, CPU), BASE,
                           [AdapterSpec(BASE, _config(k), state=states[k]) for k in range(3)])
    datasets = [held_out, train[1][:7], held_out[:13]]
    model.train()

    losses = evaluate_losses(model, datasets, pad_id=pad_id, batch_size=4, device=CPU)

    for k, data in enumerate(datasets):
        expected = evaluate_loss(_isolated(preset, k, states[k]), data, pad_id=pad_id, batch_size=16, device=CPU)
        assert losses[k] == pytest.approx(expected, rel=1e-5)
    assert len(set(losses)) == 3
    assert model.training  # the mode it had before


def test_dropout_trains(setup) -> None:
    preset, pad_id, train, held_out = setup
    model = MultiLoraModel(load_causal_lm(preset, CPU), BASE,
                           [AdapterSpec(BASE, _config(k, dropout=0.1), init_seed=k) for k in (0, 1)])
    before = evaluate_losses(model, [held_out, held_out], pad_id=pad_id, batch_size=16, device=CPU)
    results = train_adapters(model, [TrainingPlan(train[k], lr=1e-2, batch_size=8, steps=15) for k in (0, 1)],
                             pad_id=pad_id, device=CPU)
    after = evaluate_losses(model, [held_out, held_out], pad_id=pad_id, batch_size=16, device=CPU)
    assert [r.steps for r in results] == [15, 15]
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_bad_input_is_refused(setup) -> None:
    preset, pad_id, train, _ = setup
    base = load_causal_lm(preset, CPU)
    good = AdapterSpec(BASE, _config(0))
    plan = TrainingPlan(train[0], lr=1e-3, batch_size=4, steps=1)

    with pytest.raises(InvalidInput, match=r"adapter 1 is for base 'other-model' but the model is 'tiny-llama@test'"):
        MultiLoraModel(base, BASE, [good, AdapterSpec("other-model", _config(1))])
    with pytest.raises(InvalidInput, match="no adapters"):
        MultiLoraModel(base, BASE, [])
    with pytest.raises(InvalidInput, match="adapter 1: no training examples"):
        train_batched(base, BASE, [good, good], [plan, TrainingPlan([], lr=1e-3, batch_size=4, steps=1)],
                      pad_id=pad_id, device=CPU)
    with pytest.raises(InvalidInput, match="1 training plan"):
        train_batched(base, BASE, [good, good], [plan], pad_id=pad_id, device=CPU)
    with pytest.raises(InvalidInput, match="adapter 0: steps must be at least 1"):
        train_batched(base, BASE, [good], [TrainingPlan(train[0], lr=1e-3, batch_size=4, steps=0)],
                      pad_id=pad_id, device=CPU)
    # A starting state made for another config (rank 8 instead of 4) does not fit.
    wrong = adapter_state(_isolated(preset, 1))
    with pytest.raises(InvalidInput, match="adapter 0: starting state does not fit"):
        MultiLoraModel(load_causal_lm(preset, CPU), BASE, [AdapterSpec(BASE, _config(0), state=wrong)])
    with pytest.raises(InvalidInput, match="cannot add LoRA adapter 0"):
        MultiLoraModel(load_causal_lm(preset, CPU), BASE, [AdapterSpec(BASE, lora_config(4, 8, 0.0, ["nope"]))])
    model = MultiLoraModel(load_causal_lm(preset, CPU), BASE, [good])
    with pytest.raises(InvalidInput, match="adapter 0: no evaluation examples"):
        evaluate_losses(model, [[]], pad_id=pad_id, batch_size=4, device=CPU)
