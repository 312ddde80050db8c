"""Bottleneck adapters: serial (Houlsby et al. 2019) and parallel (He et al. 2022), as a fedtune
tuner registered with peft."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class BottleneckOptions(MethodOptions):
    """``peft:`` options of ``method: bottleneck``."""

    method: Literal["bottleneck"] = "bottleneck"
    bottleneck_size: int = Field(16, gt=0, le=65536)
    # serial: after the module, on its output (Houlsby); parallel: beside it, from its input (He et al.).
    placement: Literal["serial", "parallel"] = "parallel"
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    scaling: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: after the base family's attention output projection and MLP, where Houlsby places them.
    target_modules: Modules = None


@register
class Bottleneck(PeftMethod):
    """Down-project, non-linearity, up-project (zero-initialised, so a fresh adapter is the identity)."""

    name = "bottleneck"
    summary = "bottleneck adapter modules, serial (Houlsby) or parallel (He et al.) (fedtune's peft tuner)"
    family = "additive"
    options = BottleneckOptions
    markers = (".bottleneck_",)
    default_targets = (("target_modules", ("attention_output", "mlp_output")),)
    blocks = True
    quantized_base = True
    example = """\
peft:
  method: bottleneck       # fedtune's own peft tuner: consumers `import fedtune` before loading
  bottleneck_size: 16
  placement: parallel      # parallel (He et al.) or serial (Houlsby)
  non_linearity: relu      # relu, gelu, silu
  scaling: 1.0
  target_modules: null     # the base family's attention output and MLP down projections (o_proj, down_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import TaskType

        from fedtune.methods.tuners import BottleneckConfig

        return BottleneckConfig(bottleneck_size=opts.bottleneck_size, placement=opts.placement,
                                non_linearity=opts.non_linearity, scaling=opts.scaling, dropout=opts.dropout,
                                target_modules=list(opts.target_modules), task_type=TaskType.CAUSAL_LM,
                                **blocks_kwargs(layers, layers_pattern))
