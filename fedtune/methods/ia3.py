"""IA3 (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, Modules, PeftMethod
from fedtune.methods.targets import family_modules


class Ia3Options(MethodOptions):
    """``peft:`` options of ``method: ia3``."""

    method: Literal["ia3"] = "ia3"
    # None: the base family's keys, values and MLP down projection.
    target_modules: Modules = None
    # The targets whose input (not output) is rescaled: the feed-forward ones. None: the family's
    # MLP down projection, where it is among the targets.
    feedforward_modules: list[str] | None = None

    @model_validator(mode="after")
    def _subset(self) -> Ia3Options:
        if self.target_modules is None or self.feedforward_modules is None:
            return self  # checked again once the base family's defaults are in
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
    default_targets = (("target_modules", ("key_value", "mlp_output")), ("feedforward_modules", ("mlp_output",)))
    example = """\
peft:
  method: ia3
  target_modules: null        # the base family's keys, values, MLP down projection (k_proj, v_proj, down_proj in Llama)
  feedforward_modules: null   # rescaled on their input; a subset of target_modules (down_proj in Llama)
"""

    @classmethod
    def with_defaults(cls, opts: Any, model_type: str) -> Any:
        # Targets named without feed-forward modules: the family's down projection, if named.
        if opts.target_modules is not None and opts.feedforward_modules is None:
            down = family_modules(model_type, ("mlp_output",)) or []
            opts = opts.model_copy(update={"feedforward_modules": [m for m in down if m in opts.target_modules]})
        return super().with_defaults(opts, model_type)

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(target_modules=list(opts.target_modules),
                         feedforward_modules=list(opts.feedforward_modules), task_type=TaskType.CAUSAL_LM)
