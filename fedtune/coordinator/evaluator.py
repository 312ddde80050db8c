"""Evaluates a job's global adapter on the job's eval data.

For a federated job: the adapter plugged into the base. For an offsite job, Offsite-Tuning's
columns: the full model zero-shot, the emulator with the adapter, and the plug-in (the full model
with the adapter mapped onto its blocks), each as loss and perplexity. The metrics beyond the loss
that the job's ``evaluation.metrics`` names (`fedtune.metrics`) are computed for the base with the
adapter (for offsite jobs the plug-in only) and for the bare base.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.compression.emulator_storage import load_emulator
from fedtune.coordinator.offsite import OffsitePlan, plan_for
from fedtune.coordinator.state import Job
from fedtune.data import LoadedData, load_data, tokenize
from fedtune.methods import config_for
from fedtune.metrics import METRICS, evaluate_metrics
from fedtune.models import load_causal_lm, load_tokenizer
from fedtune.peft_io import build_peft_model, load_adapter_state
from fedtune.spec import JobSpec
from fedtune.training import evaluate_loss

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    full: Any  # a peft.PeftModel over the frozen base
    emulator: Any | None  # offsite jobs: a peft.PeftModel over the emulator
    plan: OffsitePlan | None
    tokenized: list[dict[str, list[int]]]
    pad_id: int
    batch_size: int
    spec: JobSpec
    tokenizer: Any
    records: LoadedData
    zero_shot: float | None = None
    zero_shot_extra: dict[str, float] | None = None  # the bare base's metrics beyond the loss


def loss_metrics(prefix: str, loss: float) -> dict[str, float]:
    """``{prefix}eval_loss`` and ``{prefix}eval_ppl`` (perplexity, capped at e^50) of a mean token loss."""
    return {f"{prefix}eval_loss": loss, f"{prefix}eval_ppl": math.exp(min(loss, 50.0))}


class Evaluator:
    """Keeps one evaluation model (two for offsite jobs) per job, loaded on first use."""

    def __init__(self, base_dir: Callable[[Job], Path], device: torch.device | None = None,
                 load_base: Callable[[Path, torch.device], Any] = load_causal_lm) -> None:
        self.base_dir = base_dir
        self.device = device or torch.device("cpu")
        # How the frozen base is built: from its files, or (on Ray) over weights shared by all jobs.
        self.load_base = load_base
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def _load(self, job: Job) -> _Loaded | None:
        spec = JobSpec.stored(job.spec_json)
        if not spec.eval_data:
            return None
        if job.job_id not in self._loaded:
            base_dir = self.base_dir(job)
            plan = plan_for(job.emulator_dir)
            tokenizer = load_tokenizer(base_dir)
            peft_cfg = spec.peft.model_dump(mode="json")

            def scoped(layers: list[int] | None) -> Any:
                if spec.tunes_blocks:
                    return None
                scope = {"layers_to_transform": layers, "layers_pattern": plan.layers_pattern} if layers and plan else {}
                return config_for({**peft_cfg, **scope})

            full = build_peft_model(self.load_base(base_dir, self.device), config=scoped(plan.full_layers if plan else None),
                                    whole_blocks=spec.tunes_blocks, layers=plan.full_layers if plan else None,
                                    layers_pattern=plan.layers_pattern if plan else None)
            emulator = None
            if plan is not None:
                emulator = build_peft_model(load_emulator(plan.emulator_dir, self.device),
                                            config=scoped(plan.emulator_layers), whole_blocks=spec.tunes_blocks,
                                            layers=plan.emulator_layers, layers_pattern=plan.layers_pattern)
            records = load_data(Path(spec.eval_data), spec.data)
            tokenized = tokenize(records, tokenizer, spec.training.max_seq_len, spec.data)
            self._loaded[job.job_id] = _Loaded(full, emulator, plan, tokenized, tokenizer.pad_token_id,
                                               spec.training.batch_size, spec, tokenizer, records)
        return self._loaded[job.job_id]

    def _loss(self, loaded: _Loaded, model: Any) -> float:
        return evaluate_loss(model, loaded.tokenized, pad_id=loaded.pad_id, batch_size=loaded.batch_size,
                             device=self.device)

    def _extra(self, loaded: _Loaded, model: Any) -> dict[str, float]:
        """The job's metrics beyond the loss (``evaluation.metrics``), none when it asks for none."""
        names = [name for name in loaded.spec.evaluation.metrics if name in METRICS]
        if not names:
            return {}
        spec = loaded.spec
        return evaluate_metrics(model, loaded.tokenizer, loaded.records, names, data=spec.data.model_dump(mode="json"),
                                max_seq_len=spec.training.max_seq_len, batch_size=loaded.batch_size,
                                device=self.device, max_new_tokens=spec.evaluation.max_new_tokens)

    def evaluate(self, job: Job, adapter: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """Eval metrics of the adapter (of the bare base when ``adapter`` is None).

        Returns ``eval_loss``/``eval_ppl`` (base + adapter; for offsite jobs the plug-in), and for
        offsite jobs also ``emulator_eval_*`` and ``zero_shot_eval_*``; with them the metrics the
        job's ``evaluation.metrics`` adds (``eval_token_accuracy``, ``eval_exact_match``,
        ``eval_choice_accuracy``..., see `fedtune.metrics.evaluate_metrics`) of the same model;
        empty without eval data.
        """
        with self._lock:
            loaded = self._load(job)
            if loaded is None:
                return {}
            if loaded.zero_shot is None:
                with loaded.full.disable_adapter():
                    loaded.zero_shot = self._loss(loaded, loaded.full)
            if adapter is None:
                if loaded.zero_shot_extra is None:
                    with loaded.full.disable_adapter():
                        loaded.zero_shot_extra = self._extra(loaded, loaded.full)
                return loss_metrics("", loaded.zero_shot) | loaded.zero_shot_extra
            out = loss_metrics("zero_shot_", loaded.zero_shot) if loaded.plan else {}
            plugged = loaded.plan.to_full(adapter) if loaded.plan else adapter
            load_adapter_state(loaded.full, plugged)
            out |= loss_metrics("", self._loss(loaded, loaded.full)) | self._extra(loaded, loaded.full)
            if loaded.plan is not None and loaded.emulator is not None:
                load_adapter_state(loaded.emulator, adapter)
                out |= loss_metrics("emulator_", self._loss(loaded, loaded.emulator))
        return out

    def release(self, job_id: str) -> None:
        """Frees a finished job's evaluation models."""
        with self._lock:
            self._loaded.pop(job_id, None)
