"""BitFit (Ben Zaken et al. 2022): only bias terms train (a fedtune tuner registered with peft)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, PeftMethod, blocks_kwargs


class BitfitOptions(MethodOptions):
    """``peft:`` options of ``method: bitfit``."""

    method: Literal["bitfit"] = "bitfit"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)


@register
class Bitfit(PeftMethod):
    """Bias-only tuning: a trained bias on each target layer (its own bias, or one it lacked)."""

    name = "bitfit"
    summary = "trains a bias per target linear layer, and nothing else (selective; fedtune's peft tuner)"
    family = "selective"
    options = BitfitOptions
    markers = (".bitfit_",)
    blocks = True
    quantized_base = True
    example = """\
peft:
  method: bitfit           # fedtune's own peft tuner: consumers `import fedtune` before loading
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import TaskType

        from fedtune.methods.tuners import BitFitConfig

        return BitFitConfig(target_modules=list(opts.target_modules), task_type=TaskType.CAUSAL_LM,
                            **blocks_kwargs(layers, layers_pattern))
