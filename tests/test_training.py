"""The local training loop and the held-out loss on the tiny preset and synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedtune.data import collate
from fedtune.errors import InvalidInput
from fedtune.models import load_causal_lm
from fedtune.peft_io import adapter_state, build_peft_model
from fedtune.training import TrainResult, evaluate_loss, train_adapter
from tests.conftest import tiny_training_setup

CPU = torch.device("cpu")
# A randomly initialised base has near-uniform outputs; adapting lm_head lets LoRA move them.
TARGETS = ["q_proj", "v_proj", "lm_head"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_training_setup(tmp_path_factory, n_clients=3, max_seq_len=64)


def _model(preset: Path):
    return build_peft_model(load_causal_lm(preset, CPU), r=8, alpha=16, dropout=0.05, target_modules=TARGETS)


def _train(model, train, pad_id: int, **overrides) -> TrainResult:
    kwargs = {
        "lr": 5e-3,
        "batch_size": 8,
        "steps": 30,
        "epochs": None,
        "seed": 0,
        "device": CPU,
        "progress": False,
    }
    return train_adapter(model, train, pad_id=pad_id, **{**kwargs, **overrides})


def test_training_lowers_held_out_loss(setup) -> None:
    preset, pad_id, train, held_out = setup
    model = _model(preset)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = evaluate_loss(model, held_out, pad_id=pad_id, batch_size=32, device=CPU)

    result = _train(model, train, pad_id)

    after = evaluate_loss(model, held_out, pad_id=pad_id, batch_size=32, device=CPU)
    assert after < 0.7 * before, (before, after)
    assert result.steps == 30
    assert result.num_examples == len(train)
    assert result.final_loss < result.mean_loss < before * 1.1
    assert result.seconds > 0
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_training_is_reproducible_by_seed(setup) -> None:
    preset, pad_id, train, _ = setup
    runs = []
    for seed in (1, 1, 2):
        model = _model(preset)
        result = _train(model, train[:40], pad_id, steps=4, seed=seed)
        runs.append((result.mean_loss, adapter_state(model)))
    (loss_a, state_a), (loss_b, state_b), (loss_c, _) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert loss_a != loss_c


def test_epochs_round_up_to_whole_steps(setup) -> None:
    preset, pad_id, train, _ = setup
    result = _train(_model(preset), train[:10], pad_id, steps=None, epochs=1.5, batch_size=4)
    assert result.steps == math.ceil(1.5 * 10 / 4)


def test_train_restores_mode_and_shows_no_bar_when_asked(setup, capsys: pytest.CaptureFixture[str]) -> None:
    preset, pad_id, train, _ = setup
    model = _model(preset)
    model.eval()
    _train(model, train[:8], pad_id, steps=1)
    assert not model.training
    assert "train" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"steps": None, "epochs": None}, "give either steps or epochs"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": None, "epochs": 0.0}, "epochs must be positive"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lr": 0.0}, "learning rate must be positive"),
    ],
)
def test_train_rejects_bad_settings(setup, overrides: dict, problem: str) -> None:
    preset, pad_id, train, _ = setup
    with pytest.raises(InvalidInput, match=problem):
        _train(_model(preset), train, pad_id, **overrides)
    with pytest.raises(InvalidInput, match="no training examples"):
        _train(_model(preset), [], pad_id)


def test_evaluate_loss_is_per_labelled_token_and_restores_mode(setup) -> None:
    preset, pad_id, _, held_out = setup
    model = _model(preset)
    model.train()
    items = held_out[:7]

    loss = evaluate_loss(model, items, pad_id=pad_id, batch_size=3, device=CPU)

    assert model.training
    model.eval()
    assert evaluate_loss(model, items, pad_id=pad_id, batch_size=7, device=CPU) == pytest.approx(
        loss, rel=1e-5
    )
    assert not model.training
    batch = collate(items, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
    )
    assert loss == pytest.approx(expected.item(), rel=1e-5)
