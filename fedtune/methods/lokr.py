"""LoKr (Yeh et al. 2023): a Kronecker product of a small and a low-rank factor."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class LokrOptions(MethodOptions):
    """``peft:`` options of ``method: lokr``."""

    method: Literal["lokr"] = "lokr"
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(8.0, gt=0)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    decompose_both: bool = False
    # -1: peft picks the factor sizes; otherwise the size of the small Kronecker factor.
    decompose_factor: int = Field(-1, ge=-1)
    target_modules: Modules = None  # None: the base family's query and value projections


@register
class Lokr(PeftMethod):
    """LoKr through peft's LoKrConfig."""

    name = "lokr"
    summary = "Kronecker product of a small dense and a low-rank factor"
    family = "reparameterised"
    options = LokrOptions
    markers = (".lokr_",)
    default_targets = (("target_modules", ("query_value",)),)
    blocks = True
    example = """\
peft:
  method: lokr
  r: 8
  alpha: 8
  decompose_both: false
  decompose_factor: -1     # -1: chosen by peft
  target_modules: null     # the base family's query and value projections (q_proj, v_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import LoKrConfig, TaskType

        return LoKrConfig(r=opts.r, alpha=opts.alpha, rank_dropout=opts.rank_dropout,
                          module_dropout=opts.module_dropout, decompose_both=opts.decompose_both,
                          decompose_factor=opts.decompose_factor, target_modules=list(opts.target_modules),
                          task_type=TaskType.CAUSAL_LM, **blocks_kwargs(layers, layers_pattern))
