"""Which modules a PEFT method adapts when a job spec names none: the base family's defaults.

A method's module options (``target_modules``, IA3's ``feedforward_modules``) default to None,
"the default for the base's family". The coordinator resolves them once, at job creation, from
the base's ``config.model_type`` through :data:`FAMILIES`, and stores the explicit lists in the
job, so every client and the published ``adapter_config.json`` name the real modules.

Each method asks for roles rather than names (LoRA: the attention's query and value projections;
BitFit: every linear layer of attention and MLP), because the same role has different names in
each family: ``q_proj``/``v_proj`` in Llama, the fused ``qkv_proj`` in Phi-3, ``c_attn`` in GPT-2.
A ``model_type`` outside the table falls back to peft's own mappings
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_*``) for the roles peft maps.

Torch-free: the job spec's boundary imports this without peft; peft is imported for the fallback only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from fedtune.methods.base import MethodOptions, PeftMethod

Role = Literal["query_value", "key_value", "attention_output", "mlp_output", "linears", "norms"]


@dataclass(frozen=True)
class FamilyModules:
    """The module names of one architecture family, by role (name suffixes, as peft matches them).

    Attributes:
        query_value: The attention's query and value projections (LoRA and its kin; where they
            are fused with the key, the fused projection).
        key_value: The projections whose outputs IA3 rescales: keys and values.
        attention_output: The attention's output projection.
        mlp_output: The MLP's down projection (IA3's feed-forward module, rescaled on its input).
        linears: Every linear layer of attention and MLP (BitFit).
        norms: The normalisation layers: each block's and the final one (LN tuning).
    """

    query_value: tuple[str, ...]
    key_value: tuple[str, ...]
    attention_output: tuple[str, ...]
    mlp_output: tuple[str, ...]
    linears: tuple[str, ...]
    norms: tuple[str, ...]


_LLAMA = FamilyModules(
    query_value=("q_proj", "v_proj"),
    key_value=("k_proj", "v_proj"),
    attention_output=("o_proj",),
    mlp_output=("down_proj",),
    linears=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    norms=("input_layernorm", "post_attention_layernorm", "norm"),
)
# Gemma 2 and 3 also normalise before and after the MLP.
_GEMMA2 = replace(_LLAMA, norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                  "post_feedforward_layernorm", "norm"))

# By config.model_type, as transformers 5 names it.
FAMILIES: dict[str, FamilyModules] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Qwen3's per-head q_norm and k_norm are left to an explicit list: LN tuning's default is the
    # block norms, as for Llama.
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # Query, key and value in one projection, gate and up in another.
    "phi3": FamilyModules(
        query_value=("qkv_proj",),
        key_value=("qkv_proj",),
        attention_output=("o_proj",),
        mlp_output=("down_proj",),
        linears=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        norms=("input_layernorm", "post_attention_layernorm", "norm"),
    ),
    # Conv1D layers (weights stored transposed; peft sets fan_in_fan_out for them). Attention and
    # MLP both name their output projection c_proj, hence the parent in those two.
    "gpt2": FamilyModules(
        query_value=("c_attn",),
        key_value=("c_attn",),
        attention_output=("attn.c_proj",),
        mlp_output=("mlp.c_proj",),
        linears=("c_attn", "c_proj", "c_fc"),
        norms=("ln_1", "ln_2", "ln_f"),
    ),
    "opt": FamilyModules(
        query_value=("q_proj", "v_proj"),
        key_value=("k_proj", "v_proj"),
        attention_output=("out_proj",),
        mlp_output=("fc2",),
        linears=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        # Each block's final_layer_norm and the decoder's own share the name.
        norms=("self_attn_layer_norm", "final_layer_norm"),
    ),
}


def family_modules(model_type: str, roles: tuple[Role, ...]) -> list[str] | None:
    """The modules of ``roles`` in the family ``model_type``, without repeats (None: not known).

    Families in :data:`FAMILIES` answer every role; any other ``model_type`` is looked up in
    peft's mappings, which know the query/value, IA3 and LN-tuning modules of many families but
    not every role.
    """
    family = FAMILIES.get(model_type)
    names: list[str] = []
    for role in roles:
        found = list(getattr(family, role)) if family is not None else _from_peft(model_type, role)
        if not found:
            return None
        names += [n for n in found if n not in names]
    return names


def _from_peft(model_type: str, role: Role) -> list[str] | None:
    from peft.utils import constants as c

    feedforward = list(c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type) or [])
    found: list[str] = []
    if role == "query_value":
        found = list(c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or [])
    elif role == "norms":
        found = list(c.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING.get(model_type) or [])
    elif role == "mlp_output":
        found = feedforward
    elif role == "key_value":
        ia3 = c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type) or []
        found = [m for m in ia3 if m not in feedforward]
    # linears and attention_output: peft maps no such role.
    return found or None


def with_family_defaults(method: type[PeftMethod], opts: MethodOptions, model_type: str) -> MethodOptions:
    """``opts`` with every module option left None set to the family's modules for its roles.

    Validated again afterwards, so a method's checks across options (IA3's feed-forward modules
    being among its targets) see the resolved lists.

    Args:
        method: The job's method (its ``default_targets``: pairs of option name and roles).
        opts: Its options as the spec gave them.
        model_type: The base's ``config.model_type``.

    Raises:
        InvalidInput: a module option is None and the family is not known for its roles; or the
            resolved options fail the method's checks.
    """
    from pydantic import ValidationError

    resolved: dict[str, list[str]] = {}
    for field, roles in method.default_targets:
        if getattr(opts, field) is not None:
            continue
        modules = family_modules(model_type, roles)
        if modules is None:
            raise InvalidInput(f"job spec: peft.{field}: fedtune has no default {field} for the base's architecture "
                               f"{model_type!r}; name the modules to adapt in peft.{field}")
        resolved[field] = modules
    if not resolved:
        return opts
    try:
        return type(opts).model_validate({**opts.model_dump(), **resolved})
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidInput(f"job spec: peft: {first['msg'].removeprefix('Value error, ')} "
                           f"(with the defaults of {model_type!r}: {resolved})") from e
