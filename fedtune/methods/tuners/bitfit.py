"""BitFit (Ben Zaken et al. 2022) as a peft tuner: a trainable bias delta on each target linear layer.

A targeted layer computes ``base(x) + delta`` with ``delta`` (one value per output feature) starting
at zero. Where the layer has a bias this is exactly tuning that bias (the base bias stays frozen and
the delta carries the change, so it can be shipped and averaged on its own); where it has none
(Llama's projections), it adds the bias BitFit would tune. Saved keys end in ``.bitfit_bias``.

This module also holds the helpers :mod:`fedtune.methods.tuners.bottleneck` shares.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType
from torch import nn

from fedtune.methods.tuners.common import (
    check_target_modules_present,
    in_out_features,
    validate_layer_selection,
    wrap_target,
)

# Every linear layer of a Llama-style decoder block.
DEFAULT_BITFIT_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj",
)


@dataclass
class BitFitConfig(PeftConfig):
    """Configuration of a :class:`BitFitModel` (``peft_type`` ``"BITFIT"``).

    Args:
        target_modules: Name suffixes of the linear layers that get a trainable bias (or a regex
            matched against full module names, or ``"all-linear"``). Defaults to all seven
            projections of a Llama-style block.
        exclude_modules: Names (or a regex) of modules never to adapt.
        layers_to_transform: Only adapt these block indexes (an int or a list of ints).
        layers_pattern: Name of the block list in module paths (``"layers"``, ``"h"``); only with
            ``layers_to_transform``. None: the first numbered path segment is the block index.
        modules_to_save: Other modules to train fully and save with the adapter.
    """

    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_BITFIT_TARGETS),
        metadata={"help": "Name suffixes of the linear layers to give a trainable bias, or a regex."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the blocks with these indexes."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the block list in module paths, with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules to train fully and save alongside the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Importing this module directly (not through fedtune.methods.tuners) must still leave peft
        # able to build and load the method; register() is idempotent and cheap after the first call.
        from fedtune.methods.tuners.registration import register

        register()
        self.peft_type = PeftType.BITFIT  # type: ignore[attr-defined]  # added by register()
        validate_layer_selection(self)


class BitFitLayer(nn.Module, BaseTunerLayer):
    """A linear layer plus one trainable bias delta per adapter: ``base(x) + sum(active deltas)``.

    Args:
        base_layer: The wrapped ``nn.Linear`` (or Conv1D).
        adapter_name: Name of the first adapter.
        config: Its config.
    """

    # peft's state-dict, trainability and device helpers find the adapter weights under these names.
    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bitfit_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Set when merging had to give the base layer a bias, so that unmerging can take it away again.
        self._bias_created_by_merge = False
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BitFitConfig) -> None:
        """Adds (or re-initialises) adapter ``adapter_name``'s bias delta, at zero."""
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Adds the deltas into the base layer's bias, giving it one if it has none.

        Args:
            safe_merge: Check the merged bias for NaN/inf before writing it.
            adapter_names: Adapters to merge; None: the active ones.

        Raises:
            ValueError: with ``safe_merge``, if the result is not finite.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.bitfit_bias:
                continue
            delta = self.bitfit_bias[name].detach()
            if base.bias is None:
                # The bias takes the weight's dtype, unless the weight is quantized (integer storage).
                dtype = base.weight.dtype if base.weight.dtype.is_floating_point else delta.dtype
                base.bias = nn.Parameter(
                    torch.zeros(self.out_features, dtype=dtype, device=delta.device), requires_grad=False
                )
                self._bias_created_by_merge = True
            merged = base.bias.data + delta.to(base.bias.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaN/inf in the merged bias; adapter {name!r} seems broken")
            base.bias.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtracts merged deltas from the base bias again (and drops a bias that merging created)."""
        if not self.merged:
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.bitfit_bias:
                base.bias.data -= self.bitfit_bias[name].detach().to(base.bias.dtype)
        if self._bias_created_by_merge:
            base.register_parameter("bias", None)
            self._bias_created_by_merge = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.bitfit_bias:
                # The delta may be fp32 over a bf16 base (peft upcasts adapters); keep the base's dtype.
                result = result + self.bitfit_bias[name].to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()


class BitFitModel(BaseTuner):
    """Injects :class:`BitFitLayer` into a model (build it with ``peft.get_peft_model``).

    Example:
        >>> model = get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM"))
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer
    # The default targets live in BitFitConfig; an explicit target_modules=None is an error.
    # (peft only reads this mapping, so the shared empty dict is safe.)
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        check_target_modules_present(peft_config, model)

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        wrap_target(self, BitFitLayer, BitFitConfig, "BitFit", peft_config, adapter_name, target, target_name, parent,
                    current_key)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> Any:
        if merge and any(
            isinstance(m, BitFitLayer) and m.get_base_layer().bias is None for m in self.model.modules()
        ):
            warnings.warn(
                "merging BitFit into bias-free layers adds bias parameters the model's config does not "
                "declare (e.g. Llama's attention_bias/mlp_bias=False); a checkpoint saved from the merged "
                "model loads correctly only with those flags set",
                UserWarning,
                stacklevel=3,
            )
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
