"""BitFit (Ben Zaken et al. 2022): only bias terms train (a fedtune tuner registered with peft)."""

from __future__ import annotations

from typing import Any, Literal

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod, blocks_kwargs


class BitfitOptions(MethodOptions):
    """``peft:`` options of ``method: bitfit``."""

    method: Literal["bitfit"] = "bitfit"
    target_modules: Modules = None  # None: every linear layer of the base family's attention and MLP


@register
class Bitfit(PeftMethod):
    """Bias-only tuning: a trained bias on each target layer (its own bias, or one it lacked)."""

    name = "bitfit"
    summary = "trains a bias per target linear layer, and nothing else (selective; fedtune's peft tuner)"
    family = "selective"
    options = BitfitOptions
    markers = (".bitfit_",)
    default_targets = (("target_modules", ("linears",)),)
    blocks = True
    quantized_base = True
    example = """\
peft:
  method: bitfit           # fedtune's own peft tuner: consumers `import fedtune` before loading
  target_modules: null     # every attention and MLP linear of the base family (q_proj ... down_proj in Llama)
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import TaskType

        from fedtune.methods.tuners import BitFitConfig

        return BitFitConfig(target_modules=list(opts.target_modules), task_type=TaskType.CAUSAL_LM,
                            **blocks_kwargs(layers, layers_pattern))
