"""LayerNorm tuning (Zhao et al. 2024): the normalisation layers' own weights train."""

from __future__ import annotations

from typing import Any, Literal

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod


class LnTuningOptions(MethodOptions):
    """``peft:`` options of ``method: ln_tuning``."""

    method: Literal["ln_tuning"] = "ln_tuning"
    target_modules: Modules = None  # None: the base family's block and final norms


@register
class LnTuning(PeftMethod):
    """LN tuning through peft's LNTuningConfig."""

    name = "ln_tuning"
    summary = "trains the normalisation layers' weights (selective)"
    family = "selective"
    options = LnTuningOptions
    markers = (".ln_tuning_layers.",)
    default_targets = (("target_modules", ("norms",)),)
    example = """\
peft:
  method: ln_tuning
  target_modules: null     # the base family's norms (input_layernorm, post_attention_layernorm, norm in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import LNTuningConfig, TaskType

        return LNTuningConfig(target_modules=list(opts.target_modules), task_type=TaskType.CAUSAL_LM)
