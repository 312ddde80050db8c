"""Publishing signed LoRA adapters into a coordinator state dir, as its round engine does.

Shared by tests/test_serve.py and benchmarks/serving.py (which serves what it publishes with a
real `fedtune serve`). Imports nothing from pytest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class Publisher:
    """Publishes signed LoRA adapters into a coordinator state dir, as its round engine does.

    Every job is LoRA with the method's Llama defaults (r 8, alpha 16 on ``q_proj`` and ``v_proj``);
    each round is signed with the state dir's coordinator key (or ``signer``) and recorded with
    the state's ``publish_round``.
    """

    def __init__(self, state_dir: Path) -> None:
        from fedtune.coordinator.keyring import KeyRing
        from fedtune.coordinator.state import CoordinatorState
        from fedtune.methods import get_method
        from fedtune.spec import default_peft

        self.state_dir = state_dir
        self.state = CoordinatorState(state_dir / "state.db")
        self.keys = KeyRing(state_dir / "keys")
        self.peft = get_method("lora").with_defaults(default_peft(), "llama")
        self._models: dict[Path, Any] = {}

    def job(self, base_dir: Path, name: str) -> str:
        """Adds a job on ``base_dir``; returns its id."""
        from fedtune.hashing import model_dir_hash

        return self.state.add_job(name=name, spec_json="{}", base_model=str(base_dir),
                                  base_hash=model_dir_hash(base_dir), files=[], initial_adapter="",
                                  peft_config_json=json.dumps(self.peft.model_dump(mode="json"))).job_id

    def publish(self, job_id: str, rnd: int, seed: int, signer: Any = None) -> Path:
        """Publishes round ``rnd`` with random LoRA weights (``seed``) large enough to change the text."""
        from fedtune.methods import config_for
        from fedtune.models import load_causal_lm
        from fedtune.peft_io import adapter_state, build_peft_model

        base_dir = Path(self.state.job(job_id).base_model)
        if base_dir not in self._models:
            base = load_causal_lm(base_dir, torch.device("cpu"), torch.float32)
            self._models[base_dir] = build_peft_model(base, config=config_for(self.peft.model_dump(mode="json")))
        model = self._models[base_dir]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        return self.publish_tensors(job_id, rnd, adapter_state(model), signer)

    def publish_tensors(self, job_id: str, rnd: int, tensors: dict[str, torch.Tensor], signer: Any = None) -> Path:
        """Publishes round ``rnd`` holding ``tensors`` (keyed as peft saves them); returns its directory."""
        from fedtune.coordinator.publish import publish_adapter, published_adapter_config
        from fedtune.peft_io import tensors_to_bytes

        job = self.state.job(job_id)
        path, manifest = publish_adapter(
            self.state_dir / "adapters", job_id=job_id, job_name=job.name, rnd=rnd,
            state=tensors_to_bytes(tensors), peft=self.peft, base_model=job.base_model,
            base_hash=job.base_hash, metrics={"eval_loss": 1.0}, contributors=2,
            adapter_config=published_adapter_config(self.peft.model_dump(mode="json"), job.base_model),
            signer=signer or self.keys.signing_key)
        self.state.publish_round(job_id, rnd, {"eval_loss": 1.0}, str(path), json.dumps(manifest))
        return path
