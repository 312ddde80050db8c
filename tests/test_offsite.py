"""Offsite jobs end to end: clients train on an emulator and never receive the full weights; the
published adapter plugs into the full model with plain peft."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.coordinator.server import RunningCoordinator
from fedtune.coordinator.state import CoordinatorState
from fedtune.hashing import file_sha256
from fedtune.models import load_tokenizer
from tests.conftest import Admin, make_spec, run_agents

pytestmark = pytest.mark.integration


def _offsite_spec(base: Path, eval_file: Path, extra: str = "", clients: int = 2) -> str:
    return (make_spec(eval_file, steps=8, rounds=1, clients=clients).replace("base_model: tiny-llama", f"base_model: {base}")
            + "mode: offsite\noffsite: {adapter_layers: [1, 1], keep: 0.5" + extra + "}\n")


def _blocks_spec(base: Path, eval_file: Path, clients: int = 2) -> str:
    # No peft line: block tuning adds no LoRA, and LoRA settings would be refused.
    return "".join(line for line in _offsite_spec(base, eval_file, ", tune: blocks", clients).splitlines(keepends=True)
                   if not line.startswith("peft:"))


def _run_to_the_end(coordinator: RunningCoordinator, admin: Admin, spec: str, data: list[Path],
                    tmp_path: Path) -> tuple[CoordinatorState, str]:
    """Creates the job, runs one agent per data file until it ends, and checks that it finished."""
    job = admin.create_job(spec)
    run_agents(coordinator, admin, job, data, tmp_path)
    state = coordinator.coordinator.state
    assert state.job(job).state == "finished", state.job(job).message
    return state, job


def _assert_clients_never_got_the_full_weights(state: CoordinatorState, job: str, base: Path, tmp_path: Path) -> None:
    """What each client downloaded: emulator files and adapters only, never a file of the full model."""
    base_hashes = {file_sha256(p) for p in base.iterdir() if p.suffix == ".safetensors"}
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if p.suffix == ".safetensors")
    emulator_files = {f.sha256 for f in state.job_files(job)}
    for i in range(2):
        cache = [p for p in (tmp_path / f"c{i}" / "cache").iterdir() if p.is_file()]
        got = {p.name for p in cache}
        assert not got & base_hashes
        adapters = got - emulator_files
        assert all(state.job_may_serve(job, sha) for sha in adapters)
        weights = sum(p.stat().st_size for p in cache if p.name in emulator_files and p.stat().st_size > 100_000)
        assert weights < base_bytes


def _assert_offsite_columns_and_plugin_beats_zero_shot(state: CoordinatorState, job: str) -> None:
    """Offsite-Tuning's columns are in the round metrics, and the plug-in beats the zero-shot full model."""
    (rnd,) = state.rounds(job)
    for key in ("zero_shot_eval_loss", "emulator_eval_loss", "eval_loss"):
        assert key in rnd.metrics
    assert rnd.metrics["eval_loss"] < rnd.metrics["zero_shot_eval_loss"]


def test_offsite_clients_never_get_the_full_weights_and_the_adapter_plugs_in(
        coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    state, job = _run_to_the_end(coordinator, admin, _offsite_spec(base6, eval_file), clients[:2], tmp_path)
    _assert_clients_never_got_the_full_weights(state, job, base6, tmp_path)
    _assert_offsite_columns_and_plugin_beats_zero_shot(state, job)

    # The published adapter targets the full model's first and last blocks and loads with plain peft.
    path = Path(state.published(job)[0][2])
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 5]
    manifest = json.loads((path / "fedtune.json").read_text())
    assert manifest["offsite"]["n_layers_full"] == 6 and manifest["offsite"]["n_layers"] < 6
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"])
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest["base_model"]), str(path))
    with torch.no_grad():
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-5)
    lora_blocks = {int(k.split(".layers.")[1].split(".")[0]) for k, _ in tuned.named_parameters() if "lora_A" in k}
    assert lora_blocks == {0, 5}


def test_offsite_block_tuning_publishes_the_tuned_blocks_for_the_full_model(
        coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    state, job = _run_to_the_end(coordinator, admin, _blocks_spec(base6, eval_file), clients[:2], tmp_path)
    _assert_clients_never_got_the_full_weights(state, job, base6, tmp_path)
    _assert_offsite_columns_and_plugin_beats_zero_shot(state, job)

    # The published tensors are every weight of the full model's blocks 0 and 5 (the emulator's
    # first and last), under the full model's own names, and no LoRA.
    path = Path(state.published(job)[0][2])
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "fedtune.json"]
    published = load_file(path / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(base6)
    own = {k: v for k, v in base.state_dict().items() if k.startswith(("model.layers.0.", "model.layers.5."))}
    tuned = {k.removeprefix("base_model.model."): v for k, v in published.items()}
    assert tuned.keys() == own.keys()
    assert any(not torch.equal(tuned[k], own[k]) for k in own)
    assert json.loads((path / "fedtune.json").read_text())["offsite"]["tune"] == "blocks"

    # Plain peft on the full base gives the full model with those two blocks swapped for the tuned ones.
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        before = base(ids).logits
        swapped = AutoModelForCausalLM.from_pretrained(base6)
        swapped.load_state_dict(swapped.state_dict() | tuned)
        expected = swapped(ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base6), str(path))
        after = loaded(ids).logits
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-4)
    assert not any("lora_" in k for k, _ in loaded.named_parameters())


def test_block_tuning_with_secure_aggregation_sums_block_deltas(
        coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The masked vectors now carry every weight of two blocks, not a LoRA: the round still closes
    # and the unmasked mean still improves the full model.
    clients, eval_file = fed_data
    spec = _blocks_spec(base6, eval_file, clients=3) + "secure_aggregation: {}\n"
    state, job = _run_to_the_end(coordinator, admin, spec, clients[:3], tmp_path)
    _assert_offsite_columns_and_plugin_beats_zero_shot(state, job)
    published = load_file(Path(state.published(job)[0][2]) / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in published} == {0, 5}


def test_block_tuning_with_a_lossy_codec_and_dp_clipping_improves_the_full_model(
        coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Block deltas through top-k + int4 with error feedback and DP clipping (no noise, so the
    # test can ask for an improvement): the codec's schema and bounds cover whole weight matrices.
    clients, eval_file = fed_data
    spec = _blocks_spec(base6, eval_file) + "codec: topk:0.5+int4\nprivacy: {clip_norm: 10.0, noise_multiplier: 0}\n"
    state, job = _run_to_the_end(coordinator, admin, spec, clients[:2], tmp_path)
    _assert_offsite_columns_and_plugin_beats_zero_shot(state, job)
    (rnd,) = state.rounds(job)
    layers = AutoModelForCausalLM.from_pretrained(base6).model.layers
    fp32_bytes = 4 * sum(p.numel() for i in (0, 5) for p in layers[i].parameters())
    assert rnd.metrics["bytes_up"] / 2 < 0.5 * fp32_bytes  # per client: top half, 4-bit


def test_block_tuning_with_client_quantization_is_refused_at_job_creation(
        coordinator, admin: Admin, base6: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    _, eval_file = fed_data
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(_blocks_spec(base6, eval_file) + "client_quantization: nf4\n")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "offsite.tune: blocks" in info.value.details() and "client_quantization" in info.value.details()
    assert coordinator.coordinator.state.jobs() == []


def test_an_emulator_of_another_base_is_refused(coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.compression.emulator import build_emulator

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(base6)
    torch.nn.init.normal_(model.lm_head.weight)
    model.save_pretrained(other)
    load_tokenizer(base6).save_pretrained(other)
    build_emulator(other, tmp_path / "emu", bottom=1, top=1, keep=0.5)
    _, eval_file = fed_data
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(_offsite_spec(base6, eval_file, f", emulator: {tmp_path / 'emu'}"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another base model" in info.value.details()
    assert coordinator.coordinator.state.jobs() == []


def test_a_base_too_small_for_the_adapter_is_refused(coordinator, admin: Admin, base6: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    _, eval_file = fed_data
    spec = _offsite_spec(base6, eval_file).replace("adapter_layers: [1, 1]", "adapter_layers: [3, 3]")
    with pytest.raises(grpc.RpcError) as info:
        admin.create_job(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert coordinator.coordinator.state.jobs() == []


def test_publishing_block_weights_under_a_lora_config_fails_and_writes_nothing(tmp_path: Path) -> None:
    # What a caller that computed the config for LoRA (not for tune: blocks) would publish: peft
    # would load it and silently drop the tuned blocks. The job must fail instead, naming a tensor.
    from fedtune.coordinator.publish import publish_adapter, published_adapter_config
    from fedtune.errors import FedtuneError
    from fedtune.methods import get_method
    from fedtune.spec import default_peft

    peft = get_method("lora").with_defaults(default_peft(), "llama")  # as a job stores it: targets resolved
    from fedtune.peft_io import tensors_to_bytes

    state = tensors_to_bytes({"base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)})
    lora_config = published_adapter_config(peft.model_dump(), "base", [0, 5], "layers")
    with pytest.raises(FedtuneError, match=r"does not load tensor 'base_model\.model\.model\.layers\.0\.mlp"):
        publish_adapter(tmp_path, job_id="j", job_name="j", rnd=1, state=state, peft=peft, base_model="base",
                        base_hash="h", metrics={}, contributors=1, adapter_config=lora_config)
    assert not (tmp_path / "j").exists()
    blocks_config = published_adapter_config(peft.model_dump(), "base", [0, 5], "layers", whole_blocks=True)
    path, _ = publish_adapter(tmp_path, job_id="j", job_name="j", rnd=1, state=state, peft=peft, base_model="base",
                              base_hash="h", metrics={}, contributors=1, adapter_config=blocks_config)
    assert json.loads((path / "adapter_config.json").read_text())["modules_to_save"] == ["layers.0", "layers.5"]


@pytest.mark.parametrize("peft", ["{method: bottleneck, bottleneck_size: 8}", "{method: loha, r: 4, alpha: 4}"])
def test_offsite_with_other_methods_on_the_adapter_blocks_plugs_into_the_full_model(  # type: ignore[no-untyped-def]
        peft: str, coordinator, admin: Admin, base6: Path, fed_data, tmp_path: Path) -> None:
    clients, eval_file = fed_data
    spec = _offsite_spec(base6, eval_file).replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                                                   f"peft: {peft}").replace("lr: 0.01", "lr: 0.03")
    state, job = _run_to_the_end(coordinator, admin, spec, clients[:2], tmp_path)
    _assert_clients_never_got_the_full_weights(state, job, base6, tmp_path)
    _assert_offsite_columns_and_plugin_beats_zero_shot(state, job)
    path = Path(state.published(job)[0][2])
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 5]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base6)), str(path))
    marker = "bottleneck_" if "bottleneck" in peft else "hada_"
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k, _ in tuned.named_parameters() if marker in k}
    assert blocks == {0, 5}
