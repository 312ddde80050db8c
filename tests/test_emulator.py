"""Offsite-Tuning emulators: layer drop, KV cache after renumbering, quantized and pruned middles,
distillation, bad inputs, and the CLI, on 6-block Llama, Qwen2, GPT-2 and OPT models from configs."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import typer
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from fedtune.cli import emulator_cmd
from fedtune.compression.blocks import find_blocks, install_blocks
from fedtune.compression.emulator import (
    build_emulator,
    check_emulator_for,
    load_emulator,
    read_emulator_manifest,
    uniform_indices,
)
from fedtune.compression.pruning import linear_layers
from fedtune.data import collate, load_jsonl, tokenize, write_synthetic_federation
from fedtune.errors import InvalidInput
from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset

CPU = torch.device("cpu")
# bottom=1, top=1 of 6 blocks leaves 4 middle blocks; keep 0.5 keeps 2 of them: 1 and 4.
LAYER_MAP = [0, 1, 4, 5]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


def _models(vocab: int, tokens: dict[str, int]) -> dict[str, nn.Module]:
    common = dict(vocab_size=vocab, **tokens)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, **common)),
        # Sliding-window attention on blocks 3..5: config.layer_types must follow the kept blocks.
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                              num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=3, max_position_embeddings=128,
                                              **common)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=6, n_head=4, n_positions=128, **common)),
        "opt": OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                                        word_embed_proj_dim=64, max_position_embeddings=128, **common)),
    }


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    # The preset's character tokenizer goes with every base, so distillation data tokenizes.
    tokenizer = load_tokenizer(materialize_preset(TINY_PRESET, root / "preset"))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    out = {}
    for name, model in _models(len(tokenizer), ids).items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    out["preset"] = root / "preset"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clients, _ = write_synthetic_federation(tmp_path_factory.mktemp("data"), n_clients=1, examples_per_client=32)
    return clients[0]


@pytest.fixture(scope="module")
def emulators(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emulators")
    out = {}
    for name in ("llama", "qwen2", "gpt2", "opt"):
        build_emulator(bases[name], root / name, bottom=1, top=1, keep=0.5)
        out[name] = root / name
    return out


def _block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in block.state_dict().items()}


def test_uniform_indices_keep_first_and_last_middle_block() -> None:
    assert uniform_indices(4, 2) == [0, 3]
    assert uniform_indices(4, 3) == [0, 2, 3]
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(5, 1) == [0]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt"])
def test_emulator_has_the_mapped_blocks_and_generates(name: str, bases: dict[str, Path],
                                                      emulators: dict[str, Path]) -> None:
    manifest = read_emulator_manifest(emulators[name])
    assert (manifest.n_layers_full, manifest.n_layers, manifest.bottom, manifest.top) == (6, 4, 1, 1)
    assert manifest.kept_middle == [1, 4] and manifest.layer_map == LAYER_MAP
    assert manifest.adapter_layers == [0, 3]
    assert manifest.bytes_emulator < manifest.bytes_base
    assert check_emulator_for(emulators[name], bases[name]) == manifest

    full = AutoModelForCausalLM.from_pretrained(bases[name]).eval()
    emu = AutoModelForCausalLM.from_pretrained(emulators[name]).eval()
    assert emu.config.num_hidden_layers == 4
    full_blocks, emu_blocks = find_blocks(full), find_blocks(emu)
    assert emu_blocks.path == manifest.blocks_path and emu_blocks.layers_pattern == manifest.layers_pattern
    for i, j in enumerate(manifest.layer_map):
        expected = _block_state(full_blocks.modules[j])
        got = _block_state(emu_blocks.modules[i])
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), f"emulator block {i} != full block {j}"
    if full_blocks.layer_types is not None:
        assert emu.config.layer_types == [full_blocks.layer_types[j] for j in LAYER_MAP]
    assert (emulators[name] / "tokenizer.json").read_bytes() == (bases[name] / "tokenizer.json").read_bytes()

    prompt = torch.tensor([[1, 5, 9, 14, 20, 7, 3, 11, 30, 12]])
    out = emu.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (1, 16)
    # The KV cache gives the same tokens as recomputing everything.
    assert torch.equal(out, emu.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt"])
def test_renumbered_blocks_in_memory_match_the_saved_emulator(name: str, bases: dict[str, Path],
                                                              emulators: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(bases[name]).eval()
    found = find_blocks(model)
    install_blocks(model, found, [found.modules[j] for j in LAYER_MAP], LAYER_MAP)
    saved = AutoModelForCausalLM.from_pretrained(emulators[name]).eval()
    prompt = torch.tensor([[1, 5, 9, 14, 20, 7, 3, 11, 30, 12]])
    # Without renumbering, the top block would write KV-cache slot 5 of a 4-block cache.
    ours = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(ours, saved.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True))


def test_keep_layers_picks_that_many_uniform_middle_blocks(bases: dict[str, Path], tmp_path: Path) -> None:
    manifest = build_emulator(bases["opt"], tmp_path / "emu", bottom=1, top=1, keep_layers=3)
    assert manifest.kept_middle == [1, 3, 4] and manifest.layer_map == [0, 1, 3, 4, 5]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "emu").config.num_hidden_layers == 5


def _lora_grads(model: nn.Module, pattern: str, *, eval_pass_first: bool) -> dict[str, torch.Tensor | None]:
    target = "c_attn" if pattern == "h" else "q_proj"
    torch.manual_seed(0)
    # Random (not zero) lora_B, so lora_A gets a non-zero gradient too.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False,
                                                  fan_in_fan_out=pattern == "h",
                                                  layers_to_transform=[0], layers_pattern=pattern))
    x = torch.tensor([[1, 5, 9, 14, 20, 7, 3, 11]])
    if eval_pass_first:
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=x)
    peft_model.train()
    peft_model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "quantize", "layer_type"), [
    ("llama", "int8", bnb.nn.Linear8bitLt),
    ("llama", "nf4", bnb.nn.Linear4bit),
    ("gpt2", "nf4", bnb.nn.Linear4bit),
])
def test_quantized_emulator_is_smaller_and_trains_its_bottom_adapter(
        name: str, quantize: str, layer_type: type, bases: dict[str, Path], emulators: dict[str, Path],
        tmp_path: Path) -> None:
    manifest = build_emulator(bases[name], tmp_path / "emu", bottom=1, top=1, keep=0.5, quantize=quantize)
    plain = read_emulator_manifest(emulators[name])
    assert manifest.quantize == quantize and manifest.bytes_emulator < plain.bytes_emulator
    model = load_emulator(tmp_path / "emu", CPU)
    found = find_blocks(model)
    middle, adapter = found.modules[1:3], [found.modules[0], found.modules[3]]
    assert all(isinstance(m, layer_type) for m in linear_layers(middle))
    assert all(type(m) in (nn.Linear, Conv1D) for m in linear_layers(adapter))
    full_blocks = find_blocks(AutoModelForCausalLM.from_pretrained(bases[name]))
    for i, block in zip((0, 3), adapter):
        expected = _block_state(full_blocks.modules[LAYER_MAP[i]])
        assert all(torch.equal(v, expected[k]) for k, v in _block_state(block).items())
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    # Gradients reach the bottom adapter through the quantized middle, also after an eval pass
    # (bitsandbytes' CPU repacking would otherwise drop or corrupt them).
    grads = _lora_grads(model, manifest.layers_pattern, eval_pass_first=True)
    reference = _lora_grads(load_emulator(tmp_path / "emu", CPU), manifest.layers_pattern, eval_pass_first=False)
    assert len(grads) == 2 and grads.keys() == reference.keys()
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, n
        assert torch.allclose(g, reference[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize(("name", "spec", "with_data"), [
    ("llama", "magnitude:0.5", False),
    ("llama", "wanda:0.5", True),
    ("gpt2", "wanda:0.25", False),
])
def test_pruning_reaches_the_stated_sparsity_in_the_middle_only(
        name: str, spec: str, with_data: bool, bases: dict[str, Path], data: Path, tmp_path: Path) -> None:
    sparsity = float(spec.split(":")[1])
    manifest = build_emulator(bases[name], tmp_path / "emu", bottom=1, top=1, keep=0.5, prune=spec,
                              distill_data=data if with_data else None)
    assert manifest.prune == spec and manifest.prune_sparsity == pytest.approx(sparsity, abs=0.01)
    found = find_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "emu"))
    for layer in linear_layers(found.modules[1:3]):
        weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
        zeros = (weight == 0).float().mean().item()
        assert zeros == pytest.approx(sparsity, abs=0.01)
        if spec.startswith("wanda"):
            # Wanda prunes the same share of every output row.
            assert ((weight == 0).sum(dim=1) >= int(weight.shape[1] * sparsity)).all()
    for layer in linear_layers([found.modules[0], found.modules[3]]):
        assert (layer.weight == 0).float().mean().item() < 0.01


def test_pruned_zeros_survive_int8_quantization(bases: dict[str, Path], tmp_path: Path) -> None:
    manifest = build_emulator(bases["llama"], tmp_path / "emu", bottom=1, top=1, keep=0.5, prune="magnitude:0.5",
                              quantize="int8")
    assert manifest.prune_sparsity == pytest.approx(0.5, abs=0.01)
    found = find_blocks(load_emulator(tmp_path / "emu", CPU))
    for layer in linear_layers(found.modules[1:3]):
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def _middle_nmse(full: nn.Module, emu: nn.Module, batches: list[dict[str, torch.Tensor]], top: int) -> float:
    def last_middle_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks = find_blocks(model).modules
        out: list[torch.Tensor] = []
        handle = blocks[len(blocks) - top - 1].register_forward_hook(
            lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        return out[0][batch["attention_mask"].bool()]

    err = ref = 0.0
    for batch in batches:
        t, s = last_middle_output(full, batch), last_middle_output(emu, batch)
        err, ref = err + (t - s).pow(2).sum().item(), ref + t.pow(2).sum().item()
    return err / ref


def test_distillation_lowers_the_normalised_mse(bases: dict[str, Path], emulators: dict[str, Path], data: Path,
                                                 tmp_path: Path) -> None:
    manifest = build_emulator(bases["llama"], tmp_path / "emu", bottom=1, top=1, keep=0.5, distill_data=data,
                              distill_steps=12, distill_lr=1e-3)
    assert manifest.distill is not None and manifest.distill.steps == 12
    assert manifest.distill.nmse_after < manifest.distill.nmse_before
    # Measured independently, against the undistilled emulator.
    tokenizer = load_tokenizer(bases["llama"])
    items = tokenize(load_jsonl(data), tokenizer, 256)
    batches = [collate(items[i:i + 8], tokenizer.pad_token_id) for i in range(0, len(items), 8)]
    full = AutoModelForCausalLM.from_pretrained(bases["llama"]).eval()
    before = _middle_nmse(full, AutoModelForCausalLM.from_pretrained(emulators["llama"]).eval(), batches, top=1)
    after = _middle_nmse(full, AutoModelForCausalLM.from_pretrained(tmp_path / "emu").eval(), batches, top=1)
    assert before == pytest.approx(manifest.distill.nmse_before, rel=1e-3)
    assert after == pytest.approx(manifest.distill.nmse_after, rel=1e-3)
    assert after < 0.9 * before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bottom": 3, "top": 3, "keep": 0.5}, "has 6 decoder blocks; adapter layers 3,3 need at least 7"),
    ({"bottom": 0, "top": 0, "keep": 0.5}, "at least one block"),
    ({"keep": 0.0}, "keep must be a fraction in (0, 1], got 0"),
    ({"keep": 1.5}, "keep must be a fraction in (0, 1], got 1.5"),
    ({"keep_layers": 0}, "keep_layers must be at least 1"),
    ({"keep_layers": 5}, "keep_layers=5 is more than the 4 middle blocks"),
    ({"keep": 0.5, "keep_layers": 2}, "exactly one of keep"),
    ({}, "exactly one of keep"),
    ({"keep": 0.5, "prune": "magnitude"}, "must be magnitude:S or wanda:S"),
    ({"keep": 0.5, "prune": "random:0.5"}, "must be magnitude:S or wanda:S"),
    ({"keep": 0.5, "prune": "wanda:half"}, "sparsity 'half' is not a number"),
    ({"keep": 0.5, "prune": "wanda:1.0"}, "sparsity must be in (0, 1), got 1"),
    ({"keep": 0.5, "quantize": "int4"}, "unknown quantization 'int4'"),
    ({"keep": 0.5, "distill_steps": 5}, "distill_steps=5 needs distill_data"),
    ({"keep": 0.5, "distill_data": Path("/nonexistent.jsonl")}, "no such data file"),
])
def test_bad_input_fails_before_any_work(kwargs: dict, message: str, bases: dict[str, Path],
                                         tmp_path: Path) -> None:
    args = {"bottom": 1, "top": 1, **kwargs}
    with pytest.raises(InvalidInput) as err:
        build_emulator(bases["llama"], tmp_path / "emu", **args)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "emu").exists()


def test_quantization_without_bitsandbytes_fails_clearly(bases: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune import quantization

    real = quantization.find_spec
    monkeypatch.setattr(quantization, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(InvalidInput, match="nf4 quantization needs bitsandbytes"):
        build_emulator(bases["llama"], tmp_path / "emu", bottom=1, top=1, keep=0.5, quantize="nf4")


def test_non_empty_output_dir_is_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "keep-me").write_text("x")
    with pytest.raises(InvalidInput, match="exists and is not an empty directory"):
        build_emulator(bases["llama"], tmp_path / "emu", bottom=1, top=1, keep=0.5)


def test_unsupported_architectures_fail_clearly(tmp_path: Path) -> None:
    class Made(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(InvalidInput, match=r"architecture Made is not supported: no decoder block list found \("):
        find_blocks(Made())
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(InvalidInput, match="architecture BertForMaskedLM is not supported"):
        find_blocks(bert)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(InvalidInput, match="is not supported"):
        build_emulator(tmp_path / "bert", tmp_path / "emu", bottom=1, top=1, keep=0.5)
    scaled = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=64,
                                        scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(InvalidInput, match="scale_attn_by_inverse_layer_idx"):
        find_blocks(scaled)


def test_check_emulator_for_rejects_another_base(bases: dict[str, Path], emulators: dict[str, Path]) -> None:
    with pytest.raises(InvalidInput, match=r"was built from another base model \(hash [0-9a-f]{12}\.\.\., expected"):
        check_emulator_for(emulators["gpt2"], bases["llama"])
    with pytest.raises(InvalidInput, match="is not an emulator"):
        read_emulator_manifest(bases["llama"])


def test_cli_build_prints_the_directory_and_a_summary(bases: dict[str, Path], tmp_path: Path) -> None:
    # Mounted as the CLI's main app mounts it; a lone-command Typer app would drop the "build" name.
    cli = typer.Typer()
    cli.add_typer(emulator_cmd.app, name="emulator")
    runner = CliRunner()
    out = tmp_path / "emu"
    # The tiny preset has 2 blocks: one adapter block and one middle block.
    result = runner.invoke(cli, [
        "emulator", "build", "--base", TINY_PRESET, "--adapter-layers", "1,0", "--keep", "1", "--quantize", "int8",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "emulator: 2 of 2 blocks" in result.stderr and "bytes vs" in result.stderr
    manifest = json.loads((out / "emulator.json").read_text())
    assert manifest["layer_map"] == [0, 1] and manifest["quantize"] == "int8"
    assert manifest["bytes_emulator"] < manifest["bytes_base"]

    bad = runner.invoke(cli, ["emulator", "build", "--base", str(bases["llama"]), "--adapter-layers", "1",
                                           "--keep", "0.5", "--out", str(tmp_path / "bad")])
    assert isinstance(bad.exception, InvalidInput) and "BOTTOM,TOP" in str(bad.exception)
