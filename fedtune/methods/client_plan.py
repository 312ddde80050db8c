"""What a client does with its adapter around local training, per method and LoRA aggregation mode.

For every method but LoRA this is the identity: load the global adapter, train, send the delta.
LoRA adds three things (:mod:`fedtune.methods.lora`):

- a client rank below the job's (``fedtune client run --max-rank``): the client trains the global
  factors cut to its rank (their leading components) and sends a delta of that rank; under secure
  aggregation, where every vector must have one length, the delta is zero-padded to the job's rank;
- ``ffa``: A stays frozen at its shared init and only B's delta travels;
- ``fedsa``: A comes from the global adapter each round, B is the client's own, kept in its state
  dir across rounds and restarts (FedSA-LoRA's personal half); both travel as deltas against the
  global adapter, so the coordinator's mean is the consensus adapter (global A, the mean of the
  clients' own B) that it publishes for consumers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.methods import config_for, get_method
from fedtune.methods.lora import is_lora_a, is_lora_b


@dataclass
class ClientPlan:
    """One client's way of training a job's adapter.

    Attributes:
        cfg: The task's ``peft`` mapping.
        job_rank: The job's LoRA rank (None for other methods).
        rank: This client's rank (the job's, or lower with ``--max-rank``).
        mode: The job's ``aggregation.lora`` (factors for other methods).
        personal_path: Where a fedsa client keeps its own B.
    """

    cfg: dict[str, Any]
    job_rank: int | None
    rank: int | None
    mode: str
    personal_path: Path | None

    def peft_config(self) -> Any:
        """The peft config this client builds (at its own rank)."""
        return config_for(self.cfg, rank=self.rank if self.rank != self.job_rank else None)

    def prepare(self, model: Any) -> None:
        """Freezes what this mode does not train (ffa: every LoRA A)."""
        if self.mode == "ffa":
            for name, param in model.named_parameters():
                if ".lora_A." in name or ".lora_embedding_A." in name:
                    param.requires_grad_(False)

    def start(self, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter this client starts the round from."""
        state = dict(global_state)
        if self.rank is not None and self.rank != self.job_rank:
            from fedtune.methods.lora_aggregation import truncate_rank

            state = truncate_rank(state, self.rank)
        if self.mode == "fedsa" and self.personal_path is not None and self.personal_path.exists():
            from safetensors.torch import load_file

            personal = load_file(str(self.personal_path))
            if {k: tuple(v.shape) for k, v in personal.items()} == {k: tuple(state[k].shape) for k in personal
                                                                      if k in state}:
                state.update(personal)
        return state

    def delta(self, trained: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
              pad: bool) -> dict[str, torch.Tensor]:
        """What travels: the trained adapter minus the global one (cut to this client's rank), of
        this mode's tensors. Against the global adapter even where training started elsewhere
        (fedsa's own B), so that the coordinator's mean of deltas is the mean of the adapters.

        Args:
            pad: Zero-pad a lower-rank delta to the job's rank (secure aggregation's fixed length).
        """
        reference = dict(global_state)
        if self.rank is not None and self.rank != self.job_rank:
            from fedtune.methods.lora_aggregation import truncate_rank

            reference = truncate_rank(reference, self.rank)
        delta = {k: trained[k] - reference[k] for k in reference}
        if self.mode == "ffa":
            delta = {k: v for k, v in delta.items() if not is_lora_a(k)}
        if pad and self.rank is not None and self.job_rank is not None and self.rank != self.job_rank:
            from fedtune.methods.lora_aggregation import pad_rank

            delta = pad_rank(delta, self.job_rank)
        return delta

    def finish(self, trained: dict[str, torch.Tensor]) -> None:
        """Keeps what stays on this client (fedsa: its own B), written atomically."""
        if self.mode != "fedsa" or self.personal_path is None:
            return
        from safetensors.torch import save_file

        self.personal_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.personal_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in trained.items() if is_lora_b(k)}, str(tmp))
        tmp.replace(self.personal_path)

    def metrics(self, pad: bool) -> dict[str, float]:
        """What the update declares beside its metrics: its LoRA rank."""
        if self.job_rank is None:
            return {}
        return {"lora_rank": float(self.job_rank if pad else self.rank or self.job_rank)}


def client_plan(cfg: dict[str, Any], max_rank: int | None = None, personal_path: Path | None = None) -> ClientPlan:
    """The plan of a client with an optional rank cap, for a task's ``peft`` mapping."""
    method = get_method(str(cfg.get("method", "lora")))
    if not method.lora or cfg.get("tune") == "blocks":
        return ClientPlan(cfg, None, None, "factors", None)
    job_rank = int(cfg.get("r", 8))
    rank = min(job_rank, max_rank) if max_rank else job_rank
    return ClientPlan(cfg, job_rank, rank, str(cfg.get("lora_aggregation", "factors")), personal_path)
