"""The families users pick, on the built-in tiny presets: default target modules per family, a
federated job that publishes what plain peft loads, an offsite emulator, and QLoRA, on each of
Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2, Gemma 3, Phi-3, GPT-2 and OPT.

Jobs run over real gRPC with the real client agent (two, in threads of this process); the spec
names no target modules, so each job runs on its family's defaults.
"""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes as bnb
import grpc
import pytest
import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from fedtune.compression.blocks import find_blocks
from fedtune.compression.emulator import build_emulator, load_emulator
from fedtune.compression.pruning import linear_layers
from fedtune.errors import InvalidInput
from fedtune.methods import METHODS, config_for
from fedtune.methods.targets import FAMILIES, family_modules
from fedtune.models import PRESETS, base_model_type, load_tokenizer, materialize_preset, preset_config
from fedtune.peft_io import build_peft_model
from fedtune.quantization import load_quantized_causal_lm
from fedtune.training import train_adapter
from tests.conftest import Admin
from tests.test_methods import run_agent_threads

CPU = torch.device("cpu")
_LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_NORMS = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "norm"]
# preset: (model_type, {method: its resolved defaults}); ia3 as (target_modules, feedforward_modules).
_LLAMA_LIKE = {"lora": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bitfit": _LLAMA_LINEARS, "bottleneck": ["o_proj", "down_proj"], "ln_tuning": _LLAMA_NORMS}
EXPECTED = {
    "tiny-llama": ("llama", _LLAMA_LIKE),
    "tiny-qwen2": ("qwen2", _LLAMA_LIKE),
    "tiny-qwen3": ("qwen3", _LLAMA_LIKE),
    "tiny-mistral": ("mistral", _LLAMA_LIKE),
    "tiny-gemma": ("gemma", _LLAMA_LIKE),
    "tiny-gemma2": ("gemma2", {**_LLAMA_LIKE, "ln_tuning": _GEMMA2_NORMS}),
    "tiny-gemma3": ("gemma3_text", {**_LLAMA_LIKE, "ln_tuning": _GEMMA2_NORMS}),
    "tiny-phi3": ("phi3", {"lora": ["qkv_proj"], "ia3": (["qkv_proj", "down_proj"], ["down_proj"]),
                           "bitfit": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                           "bottleneck": ["o_proj", "down_proj"], "ln_tuning": _LLAMA_NORMS}),
    "tiny-gpt2": ("gpt2", {"lora": ["c_attn"], "ia3": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                           "bitfit": ["c_attn", "c_proj", "c_fc"], "bottleneck": ["attn.c_proj", "mlp.c_proj"],
                           "ln_tuning": ["ln_1", "ln_2", "ln_f"]}),
    "tiny-opt": ("opt", {"lora": ["q_proj", "v_proj"], "ia3": (["k_proj", "v_proj", "fc2"], ["fc2"]),
                         "bitfit": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                         "bottleneck": ["out_proj", "fc2"], "ln_tuning": ["self_attn_layer_norm", "final_layer_norm"]}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs on one torch thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: materialize_preset(name, root / name) for name in PRESETS}


def _defaults(method: str, model_type: str) -> dict[str, list[str]]:
    unit = METHODS[method]
    opts = unit.with_defaults(unit.options.model_validate({}), model_type)
    return {field: getattr(opts, field) for field, _ in unit.default_targets}


def test_every_preset_has_a_family_with_defaults() -> None:
    assert set(EXPECTED) == set(PRESETS)
    assert {model_type for model_type, _ in EXPECTED.values()} <= set(FAMILIES)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_default_targets_are_the_familys_and_name_modules_it_has(preset: str, presets: dict[str, Path]) -> None:
    model_type, expected = EXPECTED[preset]
    assert base_model_type(presets[preset]) == model_type
    for method in ("lora", "adalora", "loha", "lokr", "vera"):  # the query/value family
        assert _defaults(method, model_type) == {"target_modules": expected["lora"]}
    assert _defaults("ia3", model_type) == dict(zip(("target_modules", "feedforward_modules"), expected["ia3"],
                                                    strict=True))
    for method in ("bitfit", "bottleneck", "ln_tuning"):
        assert _defaults(method, model_type) == {"target_modules": expected[method]}, method
    # Every default names modules the family has (as peft matches names: a dotted suffix).
    with torch.device("meta"):
        config = preset_config(preset)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    names = [n for n, _ in model.named_modules()]
    for method in METHODS.values():
        for field, roles in method.default_targets:
            for target in family_modules(model_type, roles) or []:
                assert any(n == target or n.endswith(f".{target}") for n in names), (method.name, field, target)


def test_families_peft_maps_agree_with_peft_and_others_fall_back_to_it() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA

    for model_type in FAMILIES:
        if model_type in PEFT_LORA:
            assert family_modules(model_type, ("query_value",)) == PEFT_LORA[model_type], model_type
    # A family outside fedtune's table: peft's mapping for the roles peft maps, none for the others.
    assert "bloom" not in FAMILIES
    assert _defaults("lora", "bloom") == {"target_modules": ["query_key_value"]}
    with pytest.raises(InvalidInput, match=r"peft.target_modules: .* 'bloom'; name the modules"):
        _defaults("bitfit", "bloom")
    # IA3 with targets named and feed-forward modules not: the family's down projection, if named.
    ia3 = METHODS["ia3"]
    opts = ia3.with_defaults(ia3.options.model_validate({"target_modules": ["k_proj", "down_proj"]}), "llama")
    assert opts.feedforward_modules == ["down_proj"]
    opts = ia3.with_defaults(ia3.options.model_validate({"target_modules": ["k_proj"]}), "llama")
    assert opts.feedforward_modules == []
    with pytest.raises(InvalidInput, match=r"feedforward_modules \['up_proj'\] are not in target_modules"):
        ia3.with_defaults(ia3.options.model_validate({"feedforward_modules": ["up_proj"]}), "llama")
    with pytest.raises(InvalidInput, match="peft.target_modules is not set"):
        config_for({"method": "lora"})


def _refused(admin: Admin, spec: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(info.value.details())


def test_unknown_architecture_without_targets_is_refused_at_create(  # type: ignore[no-untyped-def]
        coordinator, admin: Admin, presets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = load_tokenizer(presets["tiny-llama"])
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4)
                     ).save_pretrained(tmp_path / "mamba")
    tokenizer.save_pretrained(tmp_path / "mamba")
    spec = f"base_model: {tmp_path / 'mamba'}\npeft: {{method: lora, r: 4}}\n"
    message = _refused(admin, spec)
    assert message == ("job spec: peft.target_modules: fedtune has no default target_modules for the base's "
                       "architecture 'mamba'; name the modules to adapt in peft.target_modules")
    # peft's LyCORIS layers take no GPT-2 Conv1D: refused at create too, naming the modules.
    loha = _refused(admin, "base_model: tiny-gpt2\npeft: {method: loha}\n")
    assert "peft.target_modules ['c_attn']: cannot add LOHA to the base model" in loha and "Conv1D" in loha
    assert coordinator.coordinator.state.jobs() == []
    # Named, they are the job's.
    job = admin.create_job(spec.replace("r: 4", "r: 4, target_modules: [in_proj]"))
    assert coordinator.coordinator.spec(job).peft.target_modules == ["in_proj"]


_JOB = """\
name: {preset}
base_model: {preset}
peft: {{method: lora, r: 4, alpha: 16}}
training: {{steps: 3, lr: 0.05, batch_size: 4, max_seq_len: 32}}
rounds: 2
clients_per_round: 2
min_clients: 2
round_deadline_seconds: 120
cohort_wait_seconds: 0
"""


@pytest.mark.integration
@pytest.mark.parametrize("preset", list(EXPECTED))
def test_family_federates_qlora_on_its_default_targets_and_publishes_what_peft_loads(  # type: ignore[no-untyped-def]
        preset: str, coordinator, admin: Admin, fed_data, tmp_path: Path) -> None:
    import json

    from peft import PeftModel

    clients, _ = fed_data
    # QLoRA clients (nf4 on CPU bitsandbytes); the coordinator evaluates and publishes on the fp base.
    job = admin.create_job(_JOB.format(preset=preset) + "client_quantization: nf4\n")
    service = coordinator.coordinator
    targets = EXPECTED[preset][1]["lora"]
    # Resolved once, stored explicit: what every client gets and the job's spec says.
    assert json.loads(service.state.job(job).peft_config_json)["target_modules"] == targets
    assert service.spec(job).peft.target_modules == targets
    run_agent_threads(coordinator, admin, job, clients[:2], tmp_path)
    state = service.state
    assert state.job(job).state == "finished", state.job(job).message
    assert [r.metrics["contributors"] for r in state.rounds(job)] == [2.0, 2.0]
    published = service.adapters_root / job / "round-2"
    assert sorted(json.loads((published / "adapter_config.json").read_text())["target_modules"]) == sorted(targets)
    base_dir = service.base_dir(state.job(job))
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, published).eval()
        after = tuned(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("preset", list(EXPECTED))
def test_family_tunes_offsite_and_the_adapter_plugs_into_the_full_model(  # type: ignore[no-untyped-def]
        preset: str, coordinator, admin: Admin, presets: dict[str, Path], fed_data, tmp_path: Path) -> None:
    import json

    from peft import PeftModel

    clients, _ = fed_data
    base = _deeper_base(preset, tmp_path, presets[preset])
    spec = _JOB.format(preset=preset).replace(f"base_model: {preset}", f"base_model: {base}")
    job = admin.create_job(spec + "mode: offsite\noffsite: {adapter_layers: [1, 1], keep: 0.5}\n")
    run_agent_threads(coordinator, admin, job, clients[:2], tmp_path)
    service = coordinator.coordinator
    assert service.state.job(job).state == "finished", service.state.job(job).message
    published = service.adapters_root / job / "round-2"
    config = json.loads((published / "adapter_config.json").read_text())
    # Trained on emulator blocks 0 and 2, published on the full model's blocks 0 and 3.
    assert config["layers_to_transform"] == [0, 3] and sorted(config["target_modules"]) == sorted(
        EXPECTED[preset][1]["lora"])
    full = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(4, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = full(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(full, published).eval()
        after = tuned(input_ids=ids).logits
        assert (after - before).abs().max() > 1e-4
    pattern = find_blocks(full).layers_pattern
    blocks = {int(n.split(f".{pattern}.")[1].split(".")[0]) for n, _ in tuned.named_parameters() if "lora_" in n}
    assert blocks == {0, 3}


def _deeper_base(preset: str, root: Path, tokenizer_dir: Path) -> Path:
    """A 4-block model of the preset's family (with its tokenizer), so an emulator can drop blocks."""
    config = preset_config(preset, layers=4)
    torch.manual_seed(0)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).save_pretrained(root / "base4")
    load_tokenizer(tokenizer_dir).save_pretrained(root / "base4")
    return root / "base4"


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_family_emulator_and_qlora_train_lora_on_the_default_targets(
        preset: str, presets: dict[str, Path], fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_type, expected = EXPECTED[preset]
    lora = {"method": "lora", "r": 4, "alpha": 8, "target_modules": expected["lora"]}
    ids = torch.tensor([[1, 5, 9, 20, 7, 33]])

    # Offsite: blocks 0 and 3 of 4 around one of the middle two, kept in nf4.
    base = _deeper_base(preset, tmp_path, presets[preset])
    manifest = build_emulator(base, tmp_path / "emu", bottom=1, top=1, keep=0.5, quantize="nf4")
    assert manifest.model_type == model_type and manifest.layer_map == [0, 1, 3]
    emulator = load_emulator(tmp_path / "emu", CPU)
    found = find_blocks(emulator)
    assert len(found) == 3
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linear_layers(found.modules[1:2]))
    assert all(type(m) in (nn.Linear, Conv1D) for m in linear_layers([found.modules[0], found.modules[2]]))
    # A tied output head stays tied to the embeddings in the emulator.
    tied = emulator.get_output_embeddings().weight is emulator.get_input_embeddings().weight
    assert tied == bool(emulator.config.tie_word_embeddings)
    model = build_peft_model(emulator, config=config_for({**lora, "layers_to_transform": [0, 2],
                                                          "layers_pattern": manifest.layers_pattern}))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], emulator.config.vocab_size) and math.isfinite(out.loss.item())
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    adapted = {int(n.split(f".{manifest.layers_pattern}.")[1].split(".")[0]) for n in grads}
    assert adapted == {0, 2} and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)

    # QLoRA: the 2-block preset in nf4, one training step of LoRA on the default targets.
    quantized = load_quantized_causal_lm(presets[preset], CPU, "nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    model = build_peft_model(quantized, config=config_for(lora))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = load_tokenizer(presets[preset])
    from fedtune.data import load_jsonl, tokenize

    items = tokenize(load_jsonl(fed_data[0][0])[:4], tokenizer, max_seq_len=32)
    result = train_adapter(model, items, pad_id=tokenizer.pad_token_id, lr=1e-2, batch_size=4, steps=1, epochs=None,
                           seed=0, device=CPU, progress=False)
    assert math.isfinite(result.final_loss)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
