"""Soft prompts: prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021; P-tuning v2's
deep prompts are prefix tuning: ``prefix_tuning`` here).

P-tuning v1 (peft's PromptEncoder) is not offered: peft saves its encoder's output embeddings, not
the encoder that trains, so what a client would send and what it trains are different tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedtune.methods import register
from fedtune.methods.base import MethodOptions, PeftMethod

_OFFSITE = ("{name} adds virtual tokens that every block attends to, including the emulator's frozen, "
            "compressed middle, so the tuned prompt would not transfer to the full model; offsite tuning "
            "needs a method confined to the adapter blocks (lora, loha, lokr, vera, bitfit, bottleneck)")


class _Prompts(PeftMethod):
    family = "additive"
    markers = ("prompt_embeddings",)
    prompt = True
    quantized_base = True
    # Under peft 0.21 / transformers 5, generate() with virtual tokens does not decode what the
    # forward pass computes: prefix tuning's prefix is left out of every step (on Llama, Qwen and
    # Gemma its logits are the base's), and prompt tuning's steps after the first differ from the
    # forward's logits on every tiny preset (tests/test_metrics.py checks both).
    generates = False

    @classmethod
    def virtual_tokens(cls, opts: Any) -> int:
        return int(opts.num_virtual_tokens)

    @classmethod
    def refusal(cls, opts: Any, job: Any) -> str | None:
        if job.mode == "offsite":
            return _OFFSITE.format(name=cls.name)
        return None


class PromptTuningOptions(MethodOptions):
    """``peft:`` options of ``method: prompt_tuning``."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(8, gt=0, le=4096)
    # random: a random init; sample_vocab: embeddings of random vocabulary tokens.
    init: Literal["random", "sample_vocab"] = "random"


@register
class PromptTuning(_Prompts):
    """Prompt tuning through peft's PromptTuningConfig."""

    name = "prompt_tuning"
    summary = "trainable virtual-token embeddings prepended to the input"
    options = PromptTuningOptions
    example = """\
peft:
  method: prompt_tuning
  num_virtual_tokens: 8    # prepended to every sequence (they take room beside max_seq_len)
  init: random             # or sample_vocab
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        init = PromptTuningInit.SAMPLE_VOCAB if opts.init == "sample_vocab" else PromptTuningInit.RANDOM
        return PromptTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, prompt_tuning_init=init,
                                  task_type=TaskType.CAUSAL_LM)


class PrefixTuningOptions(MethodOptions):
    """``peft:`` options of ``method: prefix_tuning``."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(8, gt=0, le=4096)


@register
class PrefixTuning(_Prompts):
    """Prefix tuning (and P-tuning v2's deep prompts) through peft's PrefixTuningConfig."""

    name = "prefix_tuning"
    summary = "trainable key/value prefixes in every attention layer (P-tuning v2's deep prompts)"
    options = PrefixTuningOptions
    example = """\
peft:
  method: prefix_tuning
  num_virtual_tokens: 8    # key/value pairs prepended in every attention layer
"""

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> Any:
        from peft import PrefixTuningConfig, TaskType

        # No prefix_projection: peft saves a projected prefix as its output only, so the MLP that
        # trains would not be what travels and is averaged.
        return PrefixTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
