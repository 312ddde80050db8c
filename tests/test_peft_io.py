"""LoRA adapters through state dicts, safetensors bytes and peft-loadable directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.errors import InvalidInput
from fedtune.models import TINY_PRESET, load_causal_lm, materialize_preset
from fedtune.peft_io import (
    adapter_state,
    build_peft_model,
    bytes_to_tensors,
    load_adapter_state,
    lora_config,
    save_adapter_dir,
    tensors_to_bytes,
)

CPU = torch.device("cpu")
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
INPUT = torch.tensor([[1, 40, 41, 42, 5, 43, 44]])


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))


def _peft(preset_dir: Path, seed: int = 0) -> PeftModel:
    return build_peft_model(load_causal_lm(preset_dir, CPU), seed=seed, **LORA)


def _trained(preset_dir: Path) -> PeftModel:
    """A peft model whose adapter is not at its init (where B = 0 makes it a no-op)."""
    model = _peft(preset_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def test_adapter_init_depends_only_on_seed(preset_dir: Path) -> None:
    first, second, other = (
        adapter_state(_peft(preset_dir)),
        adapter_state(_peft(preset_dir)),
        adapter_state(_peft(preset_dir, seed=1)),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_adapter_state_is_a_detached_fp32_cpu_copy_in_peft_key_format(preset_dir: Path) -> None:
    model = _trained(preset_dir)
    state = adapter_state(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert "base_model.model.lm_head.lora_B.weight" in state
    assert not any("base_layer" in k for k in state)  # no frozen base weights ride along
    assert not any(".default." in k for k in state)  # peft drops the adapter name
    assert all(t.dtype == torch.float32 and t.device == CPU and not t.requires_grad for t in state.values())

    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_adapter_round_trips_through_bytes(preset_dir: Path) -> None:
    source = _trained(preset_dir)
    data = tensors_to_bytes(adapter_state(source), metadata={"round": "3"})
    assert data == tensors_to_bytes(adapter_state(source), metadata={"round": "3"})

    target = _peft(preset_dir, seed=5)
    load_adapter_state(target, bytes_to_tensors(data))
    assert torch.equal(_logits(target), _logits(source))


@pytest.mark.parametrize("garbage", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_bytes_to_tensors_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(InvalidInput, match="update is not a valid safetensors blob: "):
        bytes_to_tensors(garbage)


def test_load_adapter_state_names_bad_keys_shapes_and_values(preset_dir: Path) -> None:
    model = _peft(preset_dir)
    good = adapter_state(model)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(InvalidInput, match=f"lacks 1 key\\(s\\): {key}"):
        load_adapter_state(model, missing)

    extra = {**good, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 128)}
    with pytest.raises(InvalidInput, match="unexpected key\\(s\\): .*up_proj.lora_A.weight"):
        load_adapter_state(model, extra)

    with pytest.raises(InvalidInput, match=f"{key} has shape \\(2, 128\\), the model expects \\(4, 128\\)"):
        load_adapter_state(model, {**good, key: torch.zeros(2, 128)})

    with pytest.raises(InvalidInput, match=f"{key} has dtype torch.int64"):
        load_adapter_state(model, {**good, key: torch.zeros(4, 128, dtype=torch.int64)})

    with pytest.raises(InvalidInput, match=f"{key} holds NaN"):
        load_adapter_state(model, {**good, key: torch.full((4, 128), float("nan"))})


def test_saved_adapter_dir_loads_with_peft_from_pretrained(preset_dir: Path, tmp_path: Path) -> None:
    source = _trained(preset_dir)
    config = lora_config(LORA["r"], LORA["alpha"], LORA["dropout"], LORA["target_modules"])
    out = save_adapter_dir(
        config, adapter_state(source), tmp_path / "adapter", base_model_name_or_path=TINY_PRESET
    )
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert saved_config["base_model_name_or_path"] == TINY_PRESET
    assert saved_config["inference_mode"] is True
    assert config.base_model_name_or_path is None  # the caller's config is left alone

    loaded = PeftModel.from_pretrained(load_causal_lm(preset_dir, CPU), out)
    assert torch.equal(_logits(loaded), _logits(source))

    # Same files as peft's own save, so nothing downstream meets a second adapter format.
    source.save_pretrained(tmp_path / "by_peft", save_embedding_layers=False)
    ours = load_file(out / "adapter_model.safetensors")
    peft_own = load_file(tmp_path / "by_peft" / "adapter_model.safetensors")
    assert ours.keys() == peft_own.keys()
    assert all(torch.equal(ours[k], peft_own[k]) for k in ours)
    peft_config = json.loads((tmp_path / "by_peft" / "adapter_config.json").read_text())
    for cfg in (saved_config, peft_config):
        del cfg["base_model_name_or_path"]
        cfg["target_modules"] = sorted(cfg["target_modules"])  # a set inside peft
    assert saved_config == peft_config


def test_build_rejects_unknown_target_modules(preset_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot add LoRA to the base model: .*c_attn"):
        build_peft_model(
            load_causal_lm(preset_dir, CPU), r=4, alpha=8, dropout=0.0, target_modules=["c_attn"]
        )


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"r": 0}, "rank r must be at least 1, got 0"),
        ({"alpha": -1.0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
    ],
)
def test_lora_config_rejects_bad_values(kwargs: dict, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        lora_config(**{**LORA, **kwargs})


def test_whole_blocks_load_with_plain_peft_onto_exactly_those_blocks(tmp_path: Path) -> None:
    # 12 blocks: a block named "layers.1" must not also catch blocks 10 and 11, nor "layers.11" block 1.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = build_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), **LORA, layers=[1, 11],
                             layers_pattern="layers", whole_blocks=True)
    tuned = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()}
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in tuned}
    assert blocks == {1, 11}
    assert not any("lora_" in k for k in tuned)
    # Every parameter of the two blocks, nothing else.
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    own = {k for k, _ in base.named_parameters() if k.startswith(("model.layers.1.", "model.layers.11."))}
    assert {k.removeprefix("base_model.model.") for k in tuned} == own

    save_adapter_dir(lora_config(**LORA, layers=[1, 11], layers_pattern="layers", whole_blocks=True), tuned,
                     tmp_path / "adapter", str(tmp_path / "base"))
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter"))
    swapped = base.state_dict() | {k.removeprefix("base_model.model."): v for k, v in tuned.items()}
    base.load_state_dict(swapped)
    assert torch.allclose(_logits(loaded), _logits(base), atol=1e-6)
    with loaded.disable_adapter():
        untouched = _logits(loaded)
    assert not torch.allclose(untouched, _logits(base), atol=1e-4)


def test_whole_blocks_that_the_model_lacks_are_refused(preset_dir: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no block layers\.7"):
        build_peft_model(load_causal_lm(preset_dir, CPU), **LORA, layers=[0, 7], layers_pattern="layers",
                         whole_blocks=True)
