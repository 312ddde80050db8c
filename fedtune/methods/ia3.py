"""IA3 (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, PeftMethod


class Ia3Options(MethodOptions):
    """``peft:`` options of ``method: ia3``."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1)
    # The targets whose input (not output) is rescaled: the feed-forward ones.
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])

    @model_validator(mode="after")
    def _subset(self) -> Ia3Options:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


@register
class Ia3(PeftMethod):
    """IA3 through peft's IA3Config."""

    name = "ia3"
    summary = "learned rescaling vectors on keys, values and feed-forward inputs"
    family = "additive"
    options = Ia3Options
    markers = (".ia3_l",)
    quantized_base = True
    example = """\
peft:
  method: ia3
  target_modules: [k_proj, v_proj, down_proj]
  feedforward_modules: [down_proj]   # rescaled on their input; a subset of target_modules
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(target_modules=list(opts.target_modules),
                         feedforward_modules=list(opts.feedforward_modules), task_type=TaskType.CAUSAL_LM)
