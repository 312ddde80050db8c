"""LoRA (Hu et al. 2021) and its variants DoRA (Liu et al. 2024) and rsLoRA (Kalajdzievski 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class LoraOptions(MethodOptions):
    """``peft:`` options of ``method: lora``."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Modules = None  # None: the base family's query and value projections
    # DoRA: a learned magnitude per output feature on top of the LoRA direction.
    use_dora: bool = False
    # rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (stable at high ranks).
    use_rslora: bool = False
    # Per-module rank and alpha (module-name pattern -> value), as peft's LoraConfig takes them.
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    # Also train the base's biases: all of them, or those of the adapted modules.
    bias: Literal["none", "all", "lora_only"] = "none"

    @model_validator(mode="after")
    def _patterns(self) -> LoraOptions:
        for key, rank in self.rank_pattern.items():
            if not 0 < rank <= 1024:
                raise ValueError(f"rank_pattern[{key!r}] must be in 1..1024, got {rank}")
        for key, alpha in self.alpha_pattern.items():
            if alpha <= 0:
                raise ValueError(f"alpha_pattern[{key!r}] must be positive, got {alpha}")
        return self


def scaled_alpha(opts: LoraOptions, rank: int) -> float:
    """The alpha a client training at ``rank`` uses so that its scaling equals the job's.

    LoRA scales B·A by alpha / r (rsLoRA: alpha / sqrt(r)); a client at a lower rank keeps the
    job's scale, so that its factors and the global ones mean the same update.
    """
    if opts.use_rslora:
        return opts.alpha * math.sqrt(rank / opts.r)
    return opts.alpha * rank / opts.r


@register
class Lora(PeftMethod):
    """LoRA through peft's LoraConfig."""

    name = "lora"
    summary = "low-rank update B·A of chosen linear layers (use_dora, use_rslora, rank/alpha patterns, bias)"
    family = "reparameterised"
    options = LoraOptions
    markers = (".lora_",)
    default_targets = (("target_modules", ("query_value",)),)
    blocks = True
    quantized_base = True
    lora = True
    example = """\
peft:
  method: lora
  r: 8                     # rank of the update B·A
  alpha: 16                # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
  dropout: 0.0
  target_modules: null     # the base family's query and value projections (q_proj, v_proj in Llama)
  use_dora: false          # DoRA: a learned magnitude per output feature
  use_rslora: false
  rank_pattern: {}         # per-module ranks, e.g. {o_proj: 4}
  alpha_pattern: {}
  bias: none               # none, all, lora_only
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None, rank: int | None = None) -> Any:
        from peft import LoraConfig, TaskType

        r = rank or opts.r
        return LoraConfig(
            r=r,
            lora_alpha=scaled_alpha(opts, r) if rank else opts.alpha,  # type: ignore[arg-type]
            lora_dropout=opts.dropout,
            target_modules=list(opts.target_modules),
            use_dora=opts.use_dora,
            use_rslora=opts.use_rslora,
            rank_pattern=dict(opts.rank_pattern),
            alpha_pattern=dict(opts.alpha_pattern),
            bias=opts.bias,
            task_type=TaskType.CAUSAL_LM,
            **blocks_kwargs(layers, layers_pattern),
        )

    @classmethod
    def refusal(cls, opts: Any, job: Any) -> str | None:
        mode = job.aggregation.lora
        if opts.rank_pattern and mode == "exact":
            return ("aggregation.lora exact re-factors every module at the job's rank r; with a rank_pattern "
                    "use factors or ffa")
        if opts.use_dora and mode in ("exact", "ffa"):
            return (f"aggregation.lora {mode} aggregates LoRA's product B·A, but DoRA normalises it by the "
                    "direction's norm per column, so the mean of DoRA updates is not DoRA of the mean; use factors")
        return None


# --------------------------------------------------------------------------- what travels, at which rank
# torch-free (shapes only), so that job engines and the upload validator use them without torch.

def is_lora_a(key: str) -> bool:
    """Whether ``key`` is a LoRA down-projection A (rows: the rank)."""
    return ".lora_A." in key or key.endswith(".lora_embedding_A")


def is_lora_b(key: str) -> bool:
    """Whether ``key`` is a LoRA up-projection B (columns: the rank)."""
    return ".lora_B." in key or key.endswith(".lora_embedding_B")


def schema_at_rank(schema: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of an adapter whose LoRA pairs are cut to ``rank`` (a client's own rank).

    A's first and B's second dimension are the rank; every other tensor keeps its shape.
    """
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in schema.items():
        if is_lora_a(key):
            out[key] = (rank, *shape[1:])
        elif is_lora_b(key):
            out[key] = (shape[0], rank, *shape[2:])
        else:
            out[key] = shape
    return out


def travelling(schema: dict[str, tuple[int, ...]], mode: str) -> dict[str, tuple[int, ...]]:
    """The tensors a client sends under ``aggregation.lora`` ``mode``.

    ffa: A is frozen at its shared init, so only B (and any other trained tensor) travels; every
    other mode sends the whole adapter.
    """
    if mode == "ffa":
        return {k: v for k, v in schema.items() if not is_lora_a(k)}
    return dict(schema)


def declared_rank(metrics: dict[str, float], job_rank: int) -> int:
    """The rank a client says its update has (``lora_rank`` among its update's metrics)."""
    value = metrics.get("lora_rank", float(job_rank))
    if value != int(value) or not 1 <= value <= job_rank:
        raise ValueError(f"update declares LoRA rank {value:g}; the job's rank is {job_rank}, "
                         f"so a client's must be in 1..{job_rank}")
    return int(value)


@dataclass(frozen=True)
class LoraAggregation:
    """How a LoRA job's round is combined (passed to the compute process with the updates).

    Attributes:
        mode: ``aggregation.lora``: factors, exact, ffa or fedsa.
        rank: The job's rank r.
        ranks: Each update's declared rank, in the order of the updates.
    """

    mode: str
    rank: int
    ranks: tuple[int, ...]

    def update_schema(self, schema: dict[str, tuple[int, ...]], i: int) -> dict[str, tuple[int, ...]]:
        """The shapes of update ``i`` as its client sent it (its rank, this mode's tensors)."""
        return travelling(schema_at_rank(schema, self.ranks[i]), self.mode)


# Key of the safetensors metadata that carries a round's ‖mean(B·A) − B'·A'‖ / ‖mean(B·A)‖ to the
# engine, which reports it as the round's ``lora_product_error`` (exact: the SVD truncation error).
PRODUCT_ERROR_METADATA = "lora_product_error"


def plain_lora(cfg: dict[str, Any]) -> bool:
    """Whether a ``peft`` mapping is LoRA without variants, which batched LoRA passes
    (:mod:`fedtune.batching`) compute: no DoRA, rsLoRA, per-module patterns or bias training, and
    FedAvg of the factors (other modes freeze or keep factors per client)."""
    if cfg.get("method", "lora") != "lora" or cfg.get("tune", "lora") != "lora":
        return False
    return (not cfg.get("use_dora") and not cfg.get("use_rslora") and not cfg.get("rank_pattern")
            and not cfg.get("alpha_pattern") and cfg.get("bias", "none") == "none"
            and cfg.get("lora_aggregation", "factors") == "factors")
