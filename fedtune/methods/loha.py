"""LoHa (Hyeon-Woo et al. 2022, FedPara): a Hadamard product of two low-rank updates."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class LohaOptions(MethodOptions):
    """``peft:`` options of ``method: loha``."""

    method: Literal["loha"] = "loha"
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(8.0, gt=0)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Modules = None  # None: the base family's query and value projections


@register
class Loha(PeftMethod):
    """LoHa through peft's LoHaConfig."""

    name = "loha"
    summary = "Hadamard product of two low-rank updates (FedPara's parameterisation)"
    family = "reparameterised"
    options = LohaOptions
    markers = (".hada_",)
    default_targets = (("target_modules", ("query_value",)),)
    blocks = True
    example = """\
peft:
  method: loha
  r: 8
  alpha: 8
  rank_dropout: 0.0
  module_dropout: 0.0
  target_modules: null     # the base family's query and value projections (q_proj, v_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import LoHaConfig, TaskType

        return LoHaConfig(r=opts.r, alpha=opts.alpha, rank_dropout=opts.rank_dropout,
                          module_dropout=opts.module_dropout, target_modules=list(opts.target_modules),
                          task_type=TaskType.CAUSAL_LM, **blocks_kwargs(layers, layers_pattern))
