"""What a PEFT method is to fedtune: a small unit, registered by name, as peft has one folder per tuner.

A unit states its options (a pydantic model, validated at the job spec's boundary, torch-free so
that job engines can read specs without importing torch), how its peft config is built (peft is
imported there only), and what the rest of the system may do with it: whether it can be confined
to offsite tuning's adapter blocks, whether its update is a plain sum (secure aggregation),
whether clients may load the base quantized under it, whether batched LoRA passes can carry it,
whether peft can generate text with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedtune.methods.targets import Role, with_family_defaults

if TYPE_CHECKING:
    from peft import PeftConfig


# A module option: a non-empty list of module name suffixes, or None for the base family's default.
Modules = Annotated[list[str], Field(min_length=1)] | None


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PeftMethod:
    """One PEFT method. Subclasses set the class attributes and implement :meth:`peft_config`.

    Attributes:
        name: The value of ``peft.method`` in a job spec.
        summary: One line for ``fedtune job init --list-methods``.
        family: additive, selective, reparameterised or hybrid (the survey's taxonomy).
        options: The pydantic model of its options (with ``method: Literal[name]``).
        blocks: It can be confined to chosen decoder blocks (``layers_to_transform``), which
            offsite tuning needs: the emulator's middle is frozen and shipped compressed.
        quantized_base: It trains on top of a bitsandbytes-quantized base (QLoRA-style).
        prompt: It prepends virtual tokens (their count takes room in the sequence).
        lora: It is LoRA (the LoRA-aware aggregation modes and heterogeneous ranks apply).
        generates: peft's ``generate`` decodes what the model's forward pass computes, so
            ``exact_match`` (greedy generation) measures the tuned model.
        example: Commented YAML of its ``peft:`` section, for ``fedtune job init --method``.
        markers: Substrings of the saved tensor names that are this method's own (what a
            published adapter_config of this peft type loads).
        default_targets: Its options that name modules (None in a spec: the base family's
            default), each paired with the roles whose modules it defaults to (see
            :mod:`fedtune.methods.targets`).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    family: ClassVar[str]
    options: ClassVar[type[MethodOptions]]
    blocks: ClassVar[bool] = False
    quantized_base: ClassVar[bool] = False
    prompt: ClassVar[bool] = False
    lora: ClassVar[bool] = False
    generates: ClassVar[bool] = True
    example: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]
    default_targets: ClassVar[tuple[tuple[str, tuple[Role, ...]], ...]] = ()

    @classmethod
    def peft_config(cls, opts: Any, *, layers: list[int] | None = None,
                    layers_pattern: str | None = None) -> PeftConfig:
        """The peft config every participant of a job builds (peft imported here only).

        Args:
            opts: This method's validated options.
            layers: Confine the adapter to these decoder blocks (offsite tuning); only for
                methods with ``blocks``.
            layers_pattern: Name of the block list in module paths ("layers", "h"), with ``layers``.
        """
        raise NotImplementedError

    @classmethod
    def with_defaults(cls, opts: Any, model_type: str) -> Any:
        """``opts`` with the module options it leaves None set to the family's (job creation).

        Raises:
            InvalidInput: the family has no default for such an option (see
                :func:`fedtune.methods.targets.with_family_defaults`).
        """
        return with_family_defaults(cls, opts, model_type)

    @classmethod
    def refusal(cls, opts: Any, job: Any) -> str | None:
        """Why this method cannot run the job as specified (None: it can). ``job`` is the JobSpec."""
        return None

    @classmethod
    def round_budget(cls, opts: Any, schema: dict[str, tuple[int, ...]], rnd: int, rounds: int) -> int | None:
        """A budget the coordinator applies after aggregating round ``rnd`` (None: no such step).

        Torch-free: job engines compute it from the adapter's shapes and hand it to the compute
        process with the round's updates (see :meth:`after_aggregate`)."""
        return None

    @classmethod
    def after_aggregate(cls, opts: Any, state: dict[str, Any], budget: int) -> tuple[dict[str, Any], dict[str, float]]:
        """The aggregated adapter after the method's own step (AdaLoRA: rank pruning), and metrics."""
        return state, {}

    @classmethod
    def virtual_tokens(cls, opts: Any) -> int:
        """How many positions of each sequence the method's virtual tokens take."""
        return 0


# Key of the safetensors metadata that carries a method's after-aggregation metrics (JSON) to the engine.
METHOD_METRICS_METADATA = "fedtune_method_metrics"


@dataclass(frozen=True)
class AfterAggregate:
    """A method's step on the aggregated adapter, as the engine hands it to the compute process."""

    peft: dict[str, Any]
    budget: int


def blocks_kwargs(layers: list[int] | None, layers_pattern: str | None) -> dict[str, Any]:
    """peft's ``layers_to_transform``/``layers_pattern`` arguments, or none without ``layers``."""
    if layers is None:
        return {}
    return {"layers_to_transform": list(layers), "layers_pattern": layers_pattern}
