"""Evaluates a job's global adapter plugged into its base model, on the job's eval data."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.coordinator.state import Job
from fedtune.data import load_jsonl, tokenize
from fedtune.models import load_causal_lm, load_tokenizer
from fedtune.peft_io import build_peft_model, load_adapter_state
from fedtune.spec import JobSpec
from fedtune.training import evaluate_loss

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    model: Any  # a peft.PeftModel over the frozen base
    tokenized: list[dict[str, list[int]]]
    pad_id: int
    batch_size: int


class Evaluator:
    """Keeps one evaluation model per job (loaded on first use) and returns eval metrics."""

    def __init__(self, base_dir: Callable[[Job], Path], device: torch.device | None = None) -> None:
        self.base_dir = base_dir
        self.device = device or torch.device("cpu")
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def _load(self, job: Job) -> _Loaded | None:
        spec = JobSpec.model_validate_json(job.spec_json)
        if not spec.eval_data:
            return None
        if job.job_id not in self._loaded:
            base_dir = self.base_dir(job)
            tokenizer = load_tokenizer(base_dir)
            base = load_causal_lm(base_dir, self.device)
            model = build_peft_model(
                base, r=spec.peft.r, alpha=spec.peft.alpha, dropout=spec.peft.dropout,
                target_modules=spec.peft.target_modules,
            )
            tokenized = tokenize(load_jsonl(Path(spec.eval_data)), tokenizer, spec.training.max_seq_len)
            self._loaded[job.job_id] = _Loaded(model, tokenized, tokenizer.pad_token_id, spec.training.batch_size)
        return self._loaded[job.job_id]

    def evaluate(self, job: Job, adapter: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """Eval loss and perplexity of base + adapter (the bare base when ``adapter`` is None).

        Returns an empty dict when the job has no eval data.
        """
        with self._lock:
            loaded = self._load(job)
            if loaded is None:
                return {}
            model = loaded.model
            if adapter is None:
                with model.disable_adapter():
                    loss = evaluate_loss(model, loaded.tokenized, pad_id=loaded.pad_id,
                                         batch_size=loaded.batch_size, device=self.device)
            else:
                load_adapter_state(model, adapter)
                loss = evaluate_loss(model, loaded.tokenized, pad_id=loaded.pad_id,
                                     batch_size=loaded.batch_size, device=self.device)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def release(self, job_id: str) -> None:
        """Frees a finished job's evaluation model."""
        with self._lock:
            self._loaded.pop(job_id, None)
