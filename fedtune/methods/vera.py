"""VeRA (Kopiczko et al. 2024): frozen shared random projections, trained scaling vectors only."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class VeraOptions(MethodOptions):
    """``peft:`` options of ``method: vera``."""

    method: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, le=8192)
    dropout: float = Field(0.0, ge=0, lt=1)
    d_initial: float = Field(0.1, gt=0)
    # Seeds the shared random projections: every participant regenerates the same ones, so they
    # never travel (and the published adapter regenerates them from this key too).
    projection_prng_key: int = Field(0, ge=0)
    target_modules: Modules = None  # None: the base family's query and value projections


@register
class Vera(PeftMethod):
    """VeRA through peft's VeraConfig."""

    name = "vera"
    summary = "shared frozen random low-rank projections; only two scaling vectors per layer train"
    family = "reparameterised"
    options = VeraOptions
    markers = (".vera_lambda_",)
    default_targets = (("target_modules", ("query_value",)),)
    blocks = True
    example = """\
peft:
  method: vera
  r: 256                   # rank of the shared random projections (frozen, regenerated from the key)
  d_initial: 0.1
  projection_prng_key: 0
  target_modules: null     # the base family's query and value projections (q_proj, v_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import TaskType, VeraConfig

        return VeraConfig(r=opts.r, vera_dropout=opts.dropout, d_initial=opts.d_initial,
                          projection_prng_key=opts.projection_prng_key, save_projection=False,
                          target_modules=list(opts.target_modules), task_type=TaskType.CAUSAL_LM,
                          **blocks_kwargs(layers, layers_pattern))
