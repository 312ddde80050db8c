"""The tiny preset, `--base` resolution, model dir hashing and loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune import models
from fedtune.errors import InvalidInput
from fedtune.hashing import file_sha256, model_dir_hash
from fedtune.models import (
    TINY_PRESET,
    is_preset,
    load_causal_lm,
    load_tokenizer,
    materialize_preset,
    pick_device,
    resolve_base,
)


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))


def test_preset_builds_byte_identical_files(preset_dir: Path, tmp_path: Path) -> None:
    again = materialize_preset(TINY_PRESET, tmp_path / "again")
    files = sorted(p.name for p in preset_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (preset_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert model_dir_hash(preset_dir) == model_dir_hash(again)


@pytest.mark.parametrize("name", [n for n in models.PRESETS if n != TINY_PRESET])
def test_every_family_preset_rebuilds_byte_identical_and_loads(name: str, tmp_path: Path) -> None:
    first, again = materialize_preset(name, tmp_path / "a"), materialize_preset(name, tmp_path / "b")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for file in files:
        assert (first / file).read_bytes() == (again / file).read_bytes(), file
    model = AutoModelForCausalLM.from_pretrained(first)
    config = json.loads((first / "config.json").read_text())
    assert model.config.model_type == config["model_type"] and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(first))


def test_preset_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    materialize_preset(TINY_PRESET, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_preset_loads_with_auto_classes(preset_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(preset_dir)
    tokenizer = AutoTokenizer.from_pretrained(preset_dir)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2
    assert model.config.max_position_embeddings == 256
    assert not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token and tokenizer.unk_token

    text = "add: 12+7 =\n 19 ~{}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]

    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_unknown_preset_names_the_known_ones(tmp_path: Path) -> None:
    assert is_preset(TINY_PRESET)
    assert not is_preset("gpt2")
    with pytest.raises(InvalidInput, match=TINY_PRESET):
        materialize_preset("huge-llama", tmp_path)


def test_resolve_base_materializes_a_preset_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = resolve_base(TINY_PRESET, tmp_path)
    assert path == tmp_path / "presets" / TINY_PRESET
    digest = model_dir_hash(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging dir left

    def fail(name: str, out_dir: Path) -> Path:
        raise AssertionError("a complete preset was rebuilt")

    monkeypatch.setattr(models, "materialize_preset", fail)
    assert resolve_base(TINY_PRESET, tmp_path) == path
    monkeypatch.undo()

    (path / "model.safetensors").unlink()  # e.g. a crash before the rename existed
    assert model_dir_hash(resolve_base(TINY_PRESET, tmp_path)) == digest


def test_resolve_base_takes_a_local_directory(preset_dir: Path, tmp_path: Path) -> None:
    assert resolve_base(str(preset_dir), tmp_path) == preset_dir


def test_resolve_base_reports_an_unreachable_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, revision: str | None = None) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InvalidInput, match=r"base model 'org/missing' is neither a preset.*no network"):
        resolve_base("org/missing", tmp_path)


def test_model_dir_hash_covers_content_not_location(preset_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / "sub").mkdir(parents=True)
    for p in preset_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    digest = model_dir_hash(copy)
    assert digest == model_dir_hash(preset_dir)

    (copy / ".lock").write_text("ignored")
    (copy / "sub" / ".hidden").write_text("ignored")
    assert model_dir_hash(copy) == digest

    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert model_dir_hash(copy) != digest


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInput, match="--device must be"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_refuses_missing_cuda() -> None:
    with pytest.raises(InvalidInput, match="--device cuda requested but CUDA is not available"):
        pick_device("cuda")


def test_load_causal_lm_on_cpu_is_fp32(preset_dir: Path) -> None:
    model = load_causal_lm(preset_dir, torch.device("cpu"))
    assert model.dtype == torch.float32
    assert not model.training


def test_load_causal_lm_rejects_a_non_model_dir(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot load a causal language model"):
        load_causal_lm(tmp_path, torch.device("cpu"))


def test_load_tokenizer_pads_right_and_falls_back_to_eos(preset_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(preset_dir)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<pad>"

    no_pad = AutoTokenizer.from_pretrained(preset_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_an_adapter_is_never_initialised_inside_another_threads_model_build(tmp_path: Path) -> None:
    # transformers swaps torch.nn.init's functions for no-ops while it builds a model (and puts back
    # what it found, so two overlapping builds can leave the no-ops for good). A peft adapter
    # initialised in that window silently gets uninitialised memory. Builds hold MODEL_BUILD_LOCK; here
    # one thread sits in transformers' no-init window and the other must wait for it.
    import threading
    import time

    import torch
    from transformers.initialization import no_init_weights

    from fedtune.models import MODEL_BUILD_LOCK, TINY_PRESET, load_causal_lm, materialize_preset
    from fedtune.peft_io import adapter_state, build_peft_model

    preset = materialize_preset(TINY_PRESET, tmp_path / "preset")
    bases = [load_causal_lm(preset, torch.device("cpu")) for _ in range(2)]

    def adapter() -> dict[str, torch.Tensor]:
        return adapter_state(build_peft_model(bases.pop(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"],
                                              seed=7))

    reference = adapter()
    inside = threading.Event()

    def another_build() -> None:
        with MODEL_BUILD_LOCK, no_init_weights():
            inside.set()
            time.sleep(0.5)

    other = threading.Thread(target=another_build)
    other.start()
    inside.wait()
    state = adapter()
    other.join()
    # The seeded init, exactly as built with no other thread around.
    assert all(torch.equal(v, reference[k]) for k, v in state.items())
    probe = torch.zeros(8)
    torch.nn.init.normal_(probe)
    assert probe.abs().sum() > 0
