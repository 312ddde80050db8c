"""AdaLoRA (Zhang et al. 2023), federated: SVD-form updates P·Λ·Q whose rank budget the coordinator
allocates round by round.

How it federates (stated, since AdaLoRA itself is a single-machine schedule):

- Clients train the triplets (P = lora_A, Λ = lora_E, Q = lora_B) with peft's AdaLoRA layers and
  never reallocate ranks themselves: peft's in-training allocator (``update_and_allocate``) is not
  called, so no client prunes on its own private sensitivity scores and every client keeps the
  same components.
- The coordinator aggregates the triplets by FedAvg (as ``aggregation.lora: factors`` does for
  LoRA), then applies the round's budget: AdaLoRA's cubic schedule, run over rounds instead of
  steps, from ``init_r`` to ``target_r`` components per module on average between round
  ``tinit`` and ``rounds - tfinal``. The components kept are those with the largest importance
  |λ|·‖P_row‖·‖Q_col‖ across all modules (AdaLoRA's sensitivity needs gradients, which the
  coordinator never sees; the magnitude of the aggregated triplet is the proxy).
- A pruned component is zeroed whole (its λ, P row and Q column). Zeros are a fixed point of
  local training (each factor's gradient is a product with the others, all zero), so a mask needs
  no extra tensor and no client code: it travels as the zero pattern of the global adapter.
- The published adapter is plain peft AdaLoRA at ``init_r`` with the pruned components zero.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class AdaloraOptions(MethodOptions):
    """``peft:`` options of ``method: adalora``."""

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, le=1024)
    target_r: int = Field(4, gt=0, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Rounds of warm-up at init_r, and final rounds at target_r.
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    target_modules: Modules = None  # None: the base family's query and value projections

    @model_validator(mode="after")
    def _budget(self) -> AdaloraOptions:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) is larger than init_r ({self.init_r})")
        return self


def round_budget(opts: AdaloraOptions, modules: int, rnd: int, rounds: int) -> int:
    """How many components all ``modules`` keep after round ``rnd`` of ``rounds`` (AdaLoRA's cubic
    schedule in rounds: init_r per module until tinit, target_r per module from rounds - tfinal)."""
    start, end = opts.init_r * modules, opts.target_r * modules
    span = rounds - opts.tfinal - opts.tinit
    if rnd <= opts.tinit:
        return start
    if rnd >= rounds - opts.tfinal or span <= 0:
        return end
    left = 1 - (rnd - opts.tinit) / span
    return round(end + (start - end) * left**3)


@register
class Adalora(PeftMethod):
    """AdaLoRA through peft's AdaLoraConfig, its budget allocated by the coordinator."""

    name = "adalora"
    summary = "SVD-form low-rank updates whose rank budget the coordinator prunes round by round"
    family = "reparameterised"
    options = AdaloraOptions
    markers = (".lora_",)
    default_targets = (("target_modules", ("query_value",)),)
    blocks = True
    example = """\
peft:
  method: adalora
  init_r: 12               # components per module at the start
  target_r: 4              # on average per module at the end (the coordinator prunes the rest)
  alpha: 16
  tinit: 0                 # rounds at init_r before pruning starts
  tfinal: 0                # last rounds at target_r
  target_modules: null     # the base family's query and value projections (q_proj, v_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import AdaLoraConfig, TaskType

        # peft's own schedule (total_step, tinit, tfinal in steps) is never run: fedtune's
        # clients do not call update_and_allocate; the coordinator runs the budget in rounds.
        return AdaLoraConfig(init_r=opts.init_r, target_r=opts.target_r, lora_alpha=opts.alpha,
                             lora_dropout=opts.dropout, target_modules=list(opts.target_modules),
                             total_step=1, tinit=0, tfinal=0, task_type=TaskType.CAUSAL_LM,
                             **blocks_kwargs(layers, layers_pattern))

    @classmethod
    def round_budget(cls, opts: Any, schema: dict[str, tuple[int, ...]], rnd: int, rounds: int) -> int | None:
        return round_budget(opts, sum(1 for k in schema if is_singular_values(k)), rnd, rounds)

    @classmethod
    def after_aggregate(cls, opts: Any, state: dict[str, Any], budget: int) -> tuple[dict[str, Any], dict[str, float]]:
        masked, kept = apply_budget(state, budget)
        return masked, {"adalora_budget": float(budget), "adalora_components": float(kept)}

    @classmethod
    def refusal(cls, opts: Any, job: Any) -> str | None:
        if opts.tinit + opts.tfinal >= job.rounds:
            return (f"tinit ({opts.tinit}) + tfinal ({opts.tfinal}) leave no round of the job's {job.rounds} "
                    "to prune in")
        return None


def is_singular_values(key: str) -> bool:
    """Whether ``key`` is an AdaLoRA module's Λ (``...lora_E``)."""
    return key.endswith(".lora_E")


def apply_budget(state: dict[str, Any], keep: int) -> tuple[dict[str, Any], int]:
    """Zeroes every component of ``state`` but the ``keep`` most important, across all modules.

    Importance: |λ_i|·‖P_i‖·‖Q_i‖ of component i (P_i: a row of lora_A, Q_i: a column of lora_B).

    Returns:
        The masked state (new tensors) and how many components are non-zero in it.
    """
    import torch

    modules = [k[: -len(".lora_E")] for k in state if is_singular_values(k)]
    scores = []
    for m in modules:
        e, a, b = state[f"{m}.lora_E"], state[f"{m}.lora_A"], state[f"{m}.lora_B"]
        scores.append(e.abs().reshape(-1).double() * a.double().norm(dim=1) * b.double().norm(dim=0))
    flat = torch.cat(scores) if scores else torch.zeros(0)
    out = dict(state)
    if keep >= flat.numel():
        return out, int((flat > 0).sum())
    threshold_index = torch.argsort(flat, descending=True)[:keep]
    keep_mask = torch.zeros_like(flat, dtype=torch.bool)
    keep_mask[threshold_index] = True
    offset = 0
    for m, s in zip(modules, scores, strict=True):
        mask = keep_mask[offset: offset + s.numel()]
        offset += s.numel()
        e, a, b = state[f"{m}.lora_E"], state[f"{m}.lora_A"], state[f"{m}.lora_B"]
        out[f"{m}.lora_E"] = e * mask.to(e.dtype).reshape(e.shape)
        out[f"{m}.lora_A"] = a * mask.to(a.dtype)[:, None]
        out[f"{m}.lora_B"] = b * mask.to(b.dtype)[None, :]
    return out, int((flat * keep_mask > 0).sum())
