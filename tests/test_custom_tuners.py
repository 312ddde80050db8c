"""fedtune's own peft tuners (bitfit, bottleneck) through peft's public API, on a tiny random Llama."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    PeftConfig,
    PeftType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.methods.tuners import (
    BitFitConfig,
    BitFitLayer,
    BottleneckConfig,
    BottleneckLayer,
    install_import_hook,
    register,
)
from fedtune.methods.tuners.registration import PEFT_TYPE_NAMES, add_peft_type_members

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, HEAD_DIM, KV_HEADS = 32, 64, 8, 2
# Output widths of a tiny Llama block's linear layers (k/v are narrower: grouped-query attention).
OUT_FEATURES = {
    "q_proj": HIDDEN, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM, "o_proj": HIDDEN,
    "gate_proj": INTERMEDIATE, "up_proj": INTERMEDIATE, "down_proj": HIDDEN,
}
IN_FEATURES = {"o_proj": HIDDEN, "down_proj": INTERMEDIATE}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Each tuner variant by name: a function making its config (extra kwargs pass through).
VARIANTS: dict[str, Callable[..., PeftConfig]] = {
    "bitfit": lambda **kw: BitFitConfig(task_type="CAUSAL_LM", **kw),
    "bottleneck-parallel": lambda **kw: BottleneckConfig(task_type="CAUSAL_LM", placement="parallel", **kw),
    "bottleneck-serial": lambda **kw: BottleneckConfig(task_type="CAUSAL_LM", placement="serial", **kw),
}


def tiny_llama() -> LlamaForCausalLM:
    """The same random tiny Llama every call."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def train(model: torch.nn.Module, tokens: torch.Tensor, steps: int = 8) -> list[float]:
    """A few AdamW steps of next-token loss on `tokens`; the losses before each step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def perturb(model: torch.nn.Module) -> None:
    """Random values in every adapter weight, so that the adapter changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)


def expected_shapes(variant: str, blocks: tuple[int, ...] = (0, 1)) -> dict[str, tuple[int, ...]]:
    """The keys and shapes `get_peft_model_state_dict` should return for a default-target variant."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block in blocks:
        if variant == "bitfit":
            for name, out in OUT_FEATURES.items():
                shapes[f"base_model.model.model.layers.{block}.{PARENT[name]}.{name}.bitfit_bias"] = (out,)
            continue
        for name in ("o_proj", "down_proj"):
            prefix = f"base_model.model.model.layers.{block}.{PARENT[name]}.{name}"
            width_in = IN_FEATURES[name] if variant == "bottleneck-parallel" else OUT_FEATURES[name]
            shapes[f"{prefix}.bottleneck_down.weight"] = (16, width_in)
            shapes[f"{prefix}.bottleneck_down.bias"] = (16,)
            shapes[f"{prefix}.bottleneck_up.weight"] = (OUT_FEATURES[name], 16)
            shapes[f"{prefix}.bottleneck_up.bias"] = (OUT_FEATURES[name],)
    return shapes


def tuner_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_adapter_leaves_logits_unchanged(variant: str, tokens: torch.Tensor) -> None:
    base = tiny_llama()
    before = logits(base, tokens)
    model = get_peft_model(base, VARIANTS[variant]())
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_lowers_loss_and_only_adapter_trains(variant: str, tokens: torch.Tensor) -> None:
    model = get_peft_model(tiny_llama(), VARIANTS[variant]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "bitfit_" if variant == "bitfit" else "bottleneck_"
    assert trainable and all(f".{prefix}" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, tokens)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_has_exactly_the_adapter_keys(variant: str) -> None:
    model = get_peft_model(tiny_llama(), VARIANTS[variant]())
    state = get_peft_model_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(variant)


@pytest.mark.parametrize("variant", ["bitfit", "bottleneck-parallel"])
def test_layers_to_transform_restricts_to_those_blocks(variant: str) -> None:
    model = get_peft_model(tiny_llama(), VARIANTS[variant](layers_to_transform=[1], layers_pattern="layers"))
    assert set(get_peft_model_state_dict(model)) == set(expected_shapes(variant, blocks=(1,)))
    assert all(".layers.1." in name for name in tuner_layers(model))


def test_all_linear_targets_every_decoder_linear_but_not_the_head() -> None:
    model = get_peft_model(tiny_llama(), BitFitConfig(target_modules="all-linear"))
    assert set(get_peft_model_state_dict(model)) == set(expected_shapes("bitfit"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_set_peft_model_state_dict_round_trip(variant: str, tokens: torch.Tensor) -> None:
    trained = get_peft_model(tiny_llama(), VARIANTS[variant]())
    perturb(trained)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(trained).items()}
    fresh = get_peft_model(tiny_llama(), VARIANTS[variant]())
    result: Any = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "bitfit_" in k or "bottleneck_" in k]
    assert torch.allclose(logits(fresh, tokens), logits(trained, tokens), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_disable_adapter_gives_base_logits(variant: str, tokens: torch.Tensor) -> None:
    base_logits = logits(tiny_llama(), tokens)
    model = get_peft_model(tiny_llama(), VARIANTS[variant]())
    perturb(model)
    assert not torch.allclose(logits(model, tokens), base_logits, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(logits(model, tokens), base_logits, atol=1e-6)
    assert not torch.allclose(logits(model, tokens), base_logits, atol=1e-4)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_bottleneck_placement_computes_its_formula(placement: str, act: str) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    config = BottleneckConfig(bottleneck_size=3, placement=placement, non_linearity=act, scaling=0.5,
                              init_weights=False)
    layer = BottleneckLayer(base, "default", config)
    x = torch.randn(2, 6)
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    f = getattr(torch.nn.functional, act)
    h = base(x)
    expected = h + 0.5 * up(f(down(h if placement == "serial" else x)))
    assert down.in_features == (5 if placement == "serial" else 6)
    assert torch.allclose(layer(x), expected)


def test_bitfit_layer_adds_to_an_existing_bias_and_merges() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    bias_before = base.bias.detach().clone()
    layer = BitFitLayer(base, "default", BitFitConfig(target_modules=["x"]))
    with torch.no_grad():
        layer.bitfit_bias["default"].copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(2, 4)
    expected = x @ base.weight.T + bias_before + torch.tensor([1.0, -2.0, 0.5])
    assert torch.allclose(layer(x), expected)
    layer.merge()
    assert torch.allclose(base.bias, bias_before + torch.tensor([1.0, -2.0, 0.5]))
    assert torch.allclose(layer(x), expected)
    layer.unmerge()
    assert torch.allclose(base.bias, bias_before)


def test_bitfit_merge_and_unload_keeps_logits(tokens: torch.Tensor) -> None:
    model = get_peft_model(tiny_llama(), VARIANTS["bitfit"]())
    perturb(model)
    adapted = logits(model, tokens)
    with pytest.warns(UserWarning, match="bias"):
        merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM) and not tuner_layers(merged)
    assert merged.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.allclose(logits(merged, tokens), adapted, atol=1e-5)


def test_bottleneck_cannot_merge_but_unloads(tokens: torch.Tensor) -> None:
    base_logits = logits(tiny_llama(), tokens)
    model = get_peft_model(tiny_llama(), VARIANTS["bottleneck-serial"]())
    perturb(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not tuner_layers(unloaded)
    assert torch.allclose(logits(unloaded, tokens), base_logits, atol=1e-6)


def test_second_adapter_is_inactive_and_frozen(tokens: torch.Tensor) -> None:
    model = get_peft_model(tiny_llama(), VARIANTS["bottleneck-parallel"]())
    model.add_adapter("other", VARIANTS["bottleneck-serial"](target_modules=["o_proj"]))
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".other." in n]
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        ".other." in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("default")
    assert set(get_peft_model_state_dict(model, adapter_name="other")) == {
        k for k in expected_shapes("bottleneck-serial") if "o_proj" in k}


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"bottleneck_size": -4}, "bottleneck_size"),
    ({"bottleneck_size": 2.5}, "bottleneck_size"),
    ({"placement": "middle"}, "placement"),
    ({"non_linearity": "tanh"}, "non_linearity"),
    ({"dropout": 1.0}, "dropout"),
    ({"scaling": float("nan")}, "scaling"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"),
])
def test_bad_bottleneck_option_names_itself(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        BottleneckConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_bitfit_option_names_itself() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        BitFitConfig(target_modules=[])
    with pytest.raises(ValueError, match="layers_to_transform"):
        BitFitConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_to_transform"):  # peft would ignore the blocks
        BitFitConfig(target_modules="all-linear", layers_to_transform=[0])


@pytest.mark.parametrize("variant", ["bitfit", "bottleneck-parallel"])
def test_target_module_the_model_lacks_is_a_clear_error(variant: str) -> None:
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] not found"):
        get_peft_model(base, VARIANTS[variant](target_modules=["o_proj", "qkv_proj"]))
    assert not tuner_layers(base)  # it failed before replacing anything


def test_non_linear_target_is_refused() -> None:
    with pytest.raises(ValueError, match="LlamaRMSNorm is not supported"):
        get_peft_model(tiny_llama(), BitFitConfig(target_modules=["input_layernorm"]))


def test_register_is_idempotent_and_peft_knows_the_types() -> None:
    members = len(PeftType._member_names_)
    register()
    add_peft_type_members(PEFT_TYPE_NAMES)
    install_import_hook()  # peft is imported here: registers (a no-op now) instead of arming a hook
    assert len(PeftType._member_names_) == members
    assert not [f for f in sys.meta_path if type(f).__name__ == "_PeftImportHook"]
    for name in PEFT_TYPE_NAMES:
        member = PeftType(name)
        assert member is PeftType[name] is getattr(PeftType, name)
        assert member == name and member in list(PeftType)
    assert BitFitConfig().peft_type is PeftType.BITFIT  # type: ignore[attr-defined]
    assert BottleneckConfig().peft_type is PeftType.BOTTLENECK  # type: ignore[attr-defined]


# The fresh process imports fedtune before peft and loads both adapters with plain peft calls.
_LOADER = textwrap.dedent("""
    import json, sys
    import fedtune
    from fedtune.methods.tuners import registration
    armed_by_fedtune = registration._hook is not None
    # Until fedtune/__init__.py installs the hook itself, arm it here (a no-op once it does).
    registration.install_import_hook()
    light = not any(m in sys.modules for m in ("torch", "peft"))
    import torch
    import peft
    from peft import PeftConfig, PeftModel
    hook_left = any(isinstance(f, registration._PeftImportHook) for f in sys.meta_path)
    real_loader = type(peft.__loader__).__name__ == type(peft.__spec__.loader).__name__ == "SourceFileLoader"
    from transformers import LlamaForCausalLM
    root = sys.argv[1]
    tokens = torch.load(root + "/tokens.pt")
    kinds = {}
    for name in sys.argv[2:]:
        kinds[name] = type(PeftConfig.from_pretrained(root + "/" + name)).__name__
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root + "/base"), root + "/" + name)
        with torch.no_grad():
            torch.save(model(input_ids=tokens).logits, root + "/" + name + "/logits.pt")
    print(json.dumps({"light": light, "armed": armed_by_fedtune, "hook_left": hook_left,
                      "real_loader": real_loader, "kinds": kinds}))
""")


def test_saved_adapters_load_in_a_fresh_process_after_import_fedtune(tmp_path: Path,
                                                                     tokens: torch.Tensor) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    torch.save(tokens, tmp_path / "tokens.pt")
    expected = {}
    for variant, make_config in VARIANTS.items():
        model = get_peft_model(tiny_llama(), make_config())
        train(model, tokens, steps=3)
        model.save_pretrained(str(tmp_path / variant))
        expected[variant] = logits(model, tokens)
        saved = json.loads((tmp_path / variant / "adapter_config.json").read_text())
        assert saved["peft_type"] == ("BITFIT" if variant == "bitfit" else "BOTTLENECK")
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path), *VARIANTS], check=False,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["light"], "import fedtune (or arming the hook) imported torch or peft"
    assert not report["hook_left"] and report["real_loader"]
    if "install_import_hook" in (REPO / "fedtune" / "__init__.py").read_text():
        assert report["armed"], "fedtune/__init__.py calls install_import_hook but no hook was armed"
    assert report["kinds"] == {"bitfit": "BitFitConfig", "bottleneck-parallel": "BottleneckConfig",
                               "bottleneck-serial": "BottleneckConfig"}
    for variant in VARIANTS:
        loaded = torch.load(tmp_path / variant / "logits.pt")
        assert torch.allclose(loaded, expected[variant], atol=1e-5), variant


@pytest.mark.parametrize("variant", ["bitfit", "bottleneck-serial"])
def test_trains_on_an_nf4_quantized_base(variant: str, tmp_path: Path, tokens: torch.Tensor) -> None:
    pytest.importorskip("bitsandbytes")
    from fedtune.quantization import load_quantized_causal_lm

    tiny_llama().save_pretrained(tmp_path / "base")
    base = load_quantized_causal_lm(tmp_path / "base", torch.device("cpu"), "nf4")
    before = logits(base, tokens)
    model = get_peft_model(base, VARIANTS[variant]())
    o_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.o_proj")
    assert isinstance(o_proj, BaseTunerLayer) and type(o_proj.get_base_layer()).__name__ == "Linear4bit"
    assert torch.equal(logits(model, tokens), before)
    losses = train(model, tokens, steps=4)
    assert losses[-1] < losses[0]
