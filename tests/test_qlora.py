"""QLoRA: the tiny preset quantized with bitsandbytes (nf4 and int8) trains LoRA on CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import bitsandbytes.cextension
import pytest
import torch

from fedtune import quantization
from fedtune.errors import InvalidInput
from fedtune.models import load_causal_lm
from fedtune.peft_io import build_peft_model
from fedtune.quantization import guard_cpu_linear4bit, load_quantized_causal_lm
from fedtune.training import evaluate_loss, train_adapter
from tests.conftest import tiny_training_setup

CPU = torch.device("cpu")
BNB_LINEAR = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
# lm_head is not quantized, so it takes an ordinary LoRA; q_proj and v_proj take bnb LoRA layers.
TARGETS = ["q_proj", "v_proj", "lm_head"]
# 2 decoder blocks x (q, k, v, o, gate, up, down).
DECODER_LINEARS = 14


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return tiny_training_setup(tmp_path_factory, n_clients=2, max_seq_len=48)


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]


def _train(model, train, pad_id: int, steps: int):  # type: ignore[no-untyped-def]
    return train_adapter(
        model,
        train,
        pad_id=pad_id,
        lr=5e-3,
        batch_size=8,
        steps=steps,
        epochs=None,
        seed=0,
        device=CPU,
        progress=False,
    )


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_decoder_linears_are_quantized_and_lm_head_is_not(setup, quantize: str) -> None:
    preset, *_ = setup
    model = load_quantized_causal_lm(preset, CPU, quantize)

    decoder_linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(decoder_linears) == DECODER_LINEARS
    assert all(isinstance(m, BNB_LINEAR[quantize]) for m in decoder_linears)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.get_memory_footprint() < load_causal_lm(preset, CPU).get_memory_footprint() / 2
    if quantize == "nf4":
        assert all(m.compute_dtype == torch.float32 for m in decoder_linears)
        assert not any(m.support_avx512bf16_for_cpu for m in decoder_linears)  # guarded by the loader
    else:
        assert guard_cpu_linear4bit(model) == 0


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_lora_trains_after_an_evaluation_pass(setup, quantize: str) -> None:
    # Evaluating first is what a client does each round, and what breaks an unguarded nf4 layer.
    preset, pad_id, train, held_out = setup
    model = build_peft_model(
        load_quantized_causal_lm(preset, CPU, quantize), r=8, alpha=16, dropout=0.05, target_modules=TARGETS
    )
    assert all(
        isinstance(model.get_submodule(name).base_layer, BNB_LINEAR[quantize])
        for name, _ in model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    )
    before = evaluate_loss(model, held_out, pad_id=pad_id, batch_size=16, device=CPU)
    start = _lora(model)

    _train(model, train, pad_id, steps=30)

    # Every LoRA tensor moved: none of them had a None gradient, including those in quantized layers.
    assert _unchanged(model, start) == []
    after = evaluate_loss(model, held_out, pad_id=pad_id, batch_size=16, device=CPU)
    assert after < 0.8 * before


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="this CPU lacks AVX512-BF16, so bitsandbytes never repacks Linear4bit and the trap cannot occur",
)
# The repacked layers run a kernel without a backward; torch warns so while it drops the gradients.
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_without_the_guard_an_evaluation_pass_stops_nf4_training(setup) -> None:
    preset, pad_id, train, held_out = setup
    model = build_peft_model(
        load_quantized_causal_lm(preset, CPU, "nf4"),
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
    evaluate_loss(model, held_out[:8], pad_id=pad_id, batch_size=8, device=CPU)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)  # repacked for good
    start = _lora(model)

    _train(model, train, pad_id, steps=2)

    # The trap: training "ran", but every LoRA gradient was None, so nothing was learned.
    assert sorted(_unchanged(model, start)) == sorted(start)
    # Guarding afterwards unpacks the layers, and training works again.
    assert guard_cpu_linear4bit(model) == DECODER_LINEARS
    _train(model, train, pad_id, steps=2)
    assert _unchanged(model, start) == []


def test_unknown_quantization_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown quantization 'fp8'.*nf4, int8"):
        load_quantized_causal_lm(tmp_path / "no-such-model", CPU, "fp8")


def test_missing_bitsandbytes_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = quantization.find_spec
    monkeypatch.setattr(
        quantization, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(InvalidInput, match=r"install fedtune\[quant\]"):
        load_quantized_causal_lm(tmp_path, CPU, "nf4")


def test_unsupported_device_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cpu or cuda devices, not mps"):
        load_quantized_causal_lm(tmp_path, torch.device("mps"), "nf4")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="CUDA is not available"):
            load_quantized_causal_lm(tmp_path, torch.device("cuda"), "int8")


def test_gpu_without_a_bitsandbytes_cuda_library_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What bitsandbytes leaves in place of its library when it ships no binary for the local CUDA.
    missing = SimpleNamespace(compiled_with_cuda=False, error_msg="No compatible CUDA binary found at x.so")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bitsandbytes.cextension, "lib", missing)
    with pytest.raises(InvalidInput, match="no working library for this GPU.*No compatible CUDA binary"):
        load_quantized_causal_lm(tmp_path, torch.device("cuda"), "nf4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_on_cuda_trains(setup) -> None:
    preset, pad_id, train, held_out = setup
    cuda = torch.device("cuda")
    base = load_quantized_causal_lm(preset, cuda, "nf4")
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    assert layer.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert base.lm_head.weight.dtype == torch.float32  # upcast by prepare_model_for_kbit_training
    assert guard_cpu_linear4bit(base) == 0
    model = build_peft_model(base, r=8, alpha=16, dropout=0.0, target_modules=TARGETS)
    before = evaluate_loss(model, held_out, pad_id=pad_id, batch_size=16, device=cuda)
    start = _lora(model)
    train_adapter(
        model,
        train,
        pad_id=pad_id,
        lr=5e-3,
        batch_size=8,
        steps=30,
        epochs=None,
        seed=0,
        device=cuda,
        progress=False,
    )
    assert _unchanged(model, start) == []
    assert evaluate_loss(model, held_out, pad_id=pad_id, batch_size=16, device=cuda) < 0.8 * before
