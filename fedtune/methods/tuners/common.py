"""What fedtune's own peft tuners share: which layers they adapt, and how a target is wrapped."""

from __future__ import annotations

from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D


def validate_layer_selection(config: Any) -> None:
    """Checks ``target_modules`` / ``layers_to_transform`` / ``layers_pattern`` of a tuner config.

    Turns a list ``target_modules`` into a set, as peft's own configs do.

    Raises:
        ValueError: naming the offending option.
    """
    if isinstance(config.target_modules, (list, tuple)):
        config.target_modules = set(config.target_modules)
    if config.target_modules is not None and not isinstance(config.target_modules, (str, set)):
        raise ValueError(f"target_modules must be a list of names or a regex, got {config.target_modules!r}")
    if isinstance(config.target_modules, set) and not config.target_modules:
        raise ValueError("target_modules must not be empty")
    if isinstance(config.exclude_modules, (list, tuple)):
        config.exclude_modules = set(config.exclude_modules)
    layers = config.layers_to_transform
    if layers is not None:
        # peft applies the block filter to name suffixes only: with a regex, or "all-linear" (which
        # it expands into full module names), it would silently adapt every block.
        if isinstance(config.target_modules, str):
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex or 'all-linear'")
        indexes = [layers] if isinstance(layers, int) else list(layers)
        if not indexes or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indexes):
            raise ValueError(f"layers_to_transform must be non-negative block indexes, got {layers!r}")
    elif config.layers_pattern:
        raise ValueError("layers_pattern only applies together with layers_to_transform")


def check_target_modules_present(config: Any, model: nn.Module) -> None:
    """Fails early, before any module is replaced, when a named target is not in the model.

    peft itself only fails when *no* name matches; a typo next to a correct name would silently
    leave that layer untuned, which in a federation means clients train less than the job says.
    Regex targets and peft's ``"all-linear"`` wildcard are left to peft.

    Raises:
        ValueError: listing the missing names and some names the model does have.
    """
    targets = config.target_modules
    if not isinstance(targets, (set, list, tuple)):
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in names))
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        shown = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
        raise ValueError(
            f"target_modules {missing} not found in the model ({type(model).__name__}); "
            f"module names it has: {shown}"
        )


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer: ``nn.Linear`` (bitsandbytes' too) or GPT-2's Conv1D.

    Raises:
        ValueError: for any other layer type.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        # Conv1D stores its weight transposed, (in, out); DeepSpeed ZeRO-3 keeps the real shape aside.
        weight = module.weight
        shape = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return int(shape[0]), int(shape[1])
    raise ValueError(
        f"target module of type {type(module).__name__} is not supported; target nn.Linear (or Conv1D) layers"
    )


# ---------------------------------------------------------------------------------------------
# Config, layer, tuner.
# ---------------------------------------------------------------------------------------------


def wrap_target(tuner: Any, layer_cls: type, config_cls: type, what: str, peft_config: PeftConfig,
                adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str) -> None:
    """A tuner's ``_create_and_replace``: adds the adapter to an already wrapped target, or wraps it.

    Args:
        tuner: The tuner model (its ``active_adapters`` and ``_replace_module``).
        layer_cls: The tuner's layer class; config_cls: its config class.
        what: The method as messages name it ("BitFit", "a bottleneck").
    """
    if not isinstance(peft_config, config_cls):
        raise TypeError(f"expected a {config_cls.__name__}, got {type(peft_config).__name__}")
    if isinstance(target, layer_cls):
        target.update_layer(adapter_name, peft_config)  # type: ignore[operator]
        return
    if isinstance(target, BaseTunerLayer):
        # ValueError, as peft raises for targets it cannot adapt.
        raise ValueError(f"{current_key} already carries a {type(target).__name__}; {what} cannot wrap it")  # noqa: TRY004
    new_module = layer_cls(target, adapter_name, peft_config)
    if adapter_name not in tuner.active_adapters:
        # An added, inactive adapter must not become trainable.
        new_module.requires_grad_(False)
    tuner._replace_module(parent, target_name, new_module, target)
