"""Safetensors blobs read and renamed without torch: what job engines publish must load as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load

from fedtune.coordinator.offsite import OffsitePlan
from fedtune.errors import InvalidInput
from fedtune.peft_io import tensors_to_bytes
from fedtune.tensor_blobs import rename, shapes


def _blob() -> bytes:
    torch.manual_seed(0)
    return tensors_to_bytes({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(16, 4),
        "x.h": torch.arange(5, dtype=torch.float16),
    }, metadata={"format": "pt"})


def test_shapes_and_renaming_keep_every_value_and_the_metadata() -> None:
    blob = _blob()
    assert shapes(blob) == {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 16),
                            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (16, 4),
                            "x.h": (5,)}
    renamed = rename(blob, lambda k: k.replace("layers.1.", "layers.7."))
    before, after = load(blob), load(renamed)
    assert set(after) == {k.replace("layers.1.", "layers.7.") for k in before}
    for key, value in before.items():
        new = after[key.replace("layers.1.", "layers.7.")]
        assert new.dtype == value.dtype and torch.equal(new, value)
    assert shapes(renamed)["x.h"] == (5,)
    assert b'"__metadata__":{"format":"pt"}' in renamed[: 8 + int.from_bytes(renamed[:8], "little")]


def test_an_emulator_adapter_is_renamed_onto_the_full_models_blocks() -> None:
    # Emulator blocks 0, 1, 2 are the full model's 0, 5, 9.
    plan = OffsitePlan(Path("emulator"), SimpleNamespace(layer_map=[0, 5, 9], layers_pattern="layers"))  # type: ignore[arg-type]
    blob = tensors_to_bytes({"m.layers.0.q.lora_A.weight": torch.ones(2, 2), "m.layers.2.q.lora_A.weight": torch.zeros(2, 2)})
    out = load(plan.to_full_blob(blob))
    assert set(out) == {"m.layers.0.q.lora_A.weight", "m.layers.9.q.lora_A.weight"}
    assert plan.to_full(load(blob)).keys() == out.keys()


def test_bad_blobs_and_name_clashes_are_refused() -> None:
    with pytest.raises(InvalidInput, match="shorter than"):
        shapes(b"abc")
    with pytest.raises(InvalidInput, match="header claims"):
        shapes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidInput, match="not JSON"):
        shapes((2).to_bytes(8, "little") + b"{x")
    with pytest.raises(InvalidInput, match="two the name"):
        rename(_blob(), lambda k: "same")


def test_a_job_engine_reads_its_spec_and_publishes_without_importing_torch() -> None:
    # What an engine actor on Ray imports: its module, the engine, state, store, keys, spec,
    # publication, and for secure aggregation the SecAgg+ server and its vector layout.
    code = ("import sys\n"
            "import fedtune.cluster.jobs, fedtune.coordinator.engine, fedtune.coordinator.publish\n"
            "import fedtune.coordinator.secure_round, fedtune.secagg.adapter_vector\n"
            "from fedtune.spec import JobSpec\n"
            "JobSpec.stored(JobSpec.model_validate({'codec': 'fp32'}, context={'fedtune-stored-spec': True})"
            ".model_dump_json())\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
