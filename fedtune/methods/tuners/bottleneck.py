"""Bottleneck adapters as a peft tuner: serial (Houlsby et al. 2019) or parallel (He et al. 2022).

Each targeted linear layer gets a small two-layer network ``up(act(down(.)))``, scaled by ``s``:

* serial: ``y = h + s * up(act(down(h)))`` with ``h = base(x)``: the adapter sits after the module;
* parallel: ``y = base(x) + s * up(act(down(x)))``: the adapter reads the module's input, so for a
  linear target it maps ``in_features -> bottleneck_size -> out_features``.

``up`` starts at zero, so a fresh adapter leaves the model's output unchanged. The default targets,
``o_proj`` and ``down_proj``, put one adapter after attention and one after the MLP of each block,
where Houlsby places them. Saved keys end in ``.bottleneck_down.weight``, ``.bottleneck_down.bias``,
``.bottleneck_up.weight`` and ``.bottleneck_up.bias``. The adapter is non-linear, so it cannot be
merged into the base weights (``unload()`` removes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from fedtune.methods.tuners.common import (
    check_target_modules_present,
    in_out_features,
    validate_layer_selection,
    wrap_target,
)

# After attention's output projection and after the MLP (Llama-style names).
DEFAULT_BOTTLENECK_TARGETS: tuple[str, ...] = ("o_proj", "down_proj")
PLACEMENTS: tuple[str, ...] = ("serial", "parallel")
NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
}


def _is_real(value: object) -> bool:
    # bool is an int subclass, but True is no bottleneck size.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a :class:`BottleneckModel` (``peft_type`` ``"BOTTLENECK"``).

    Args:
        bottleneck_size: Width of the adapter's hidden layer (> 0).
        placement: ``"serial"`` (after the module, on its output) or ``"parallel"`` (beside it, from
            its input).
        non_linearity: ``"relu"``, ``"gelu"`` or ``"silu"``.
        scaling: Factor ``s`` on the adapter's output.
        dropout: Dropout probability on the adapter's input, in [0, 1).
        target_modules: Name suffixes of the linear layers whose output the adapter modifies (or a
            regex on full module names). Defaults to ``["o_proj", "down_proj"]``.
        exclude_modules: Names (or a regex) of modules never to adapt.
        layers_to_transform: Only adapt these block indexes (an int or a list of ints).
        layers_pattern: Name of the block list in module paths; only with ``layers_to_transform``.
        modules_to_save: Other modules to train fully and save with the adapter.
        init_weights: Zero ``up`` so that a fresh adapter is the identity (False: random ``up``,
            for tests).
    """

    bottleneck_size: int = field(default=16, metadata={"help": "Hidden width of the adapter."})
    placement: str = field(
        default="parallel", metadata={"help": "'serial' (Houlsby) or 'parallel' (He et al.)."}
    )
    non_linearity: str = field(default="relu", metadata={"help": "'relu', 'gelu' or 'silu'."})
    scaling: float = field(default=1.0, metadata={"help": "Factor on the adapter's output."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_BOTTLENECK_TARGETS),
        metadata={"help": "Name suffixes of the linear layers whose output the adapter changes, or a regex."},
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
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise the up projection."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # As in BitFitConfig: a config built from this module directly must still be usable by peft.
        from fedtune.methods.tuners.registration import register

        register()
        self.peft_type = PeftType.BOTTLENECK  # type: ignore[attr-defined]  # added by register()
        if not _is_real(self.bottleneck_size) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive int, got {self.bottleneck_size!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        if not _is_real(self.scaling) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        validate_layer_selection(self)


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A linear layer with one bottleneck adapter per adapter name (see the module docstring).

    With several active adapters, parallel ones each read the layer's input and add up; serial ones
    are applied one after the other to the running output.

    Args:
        base_layer: The wrapped ``nn.Linear`` (or Conv1D).
        adapter_name: Name of the first adapter.
        config: Its config.
    """

    # Trainable weights (peft's state-dict, trainability and device helpers look for these) ...
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    # ... and the per-adapter settings peft must delete along with an adapter.
    other_param_names = (
        "bottleneck_dropout", "bottleneck_placement", "bottleneck_non_linearity", "bottleneck_scaling",
    )

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs: Any
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        # Plain dicts: settings, not state, so they stay out of the state dict.
        self.bottleneck_placement: dict[str, str] = {}
        self.bottleneck_non_linearity: dict[str, str] = {}
        self.bottleneck_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Adds (or re-initialises) adapter ``adapter_name``."""
        # A serial adapter reads the module's output, a parallel one its input.
        width_in = self.in_features if config.placement == "parallel" else self.out_features
        down = nn.Linear(width_in, config.bottleneck_size)
        up = nn.Linear(config.bottleneck_size, self.out_features)
        if config.init_weights:
            # down keeps nn.Linear's default init: with up at zero the adapter's output is zero, yet up
            # gets a gradient from the first step.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bottleneck_dropout[adapter_name] = dropout
        self.bottleneck_placement[adapter_name] = config.placement
        self.bottleneck_non_linearity[adapter_name] = config.non_linearity
        self.bottleneck_scaling[adapter_name] = config.scaling
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_output(self, name: str, h: torch.Tensor) -> torch.Tensor:
        down, up = cast(nn.Linear, self.bottleneck_down[name]), self.bottleneck_up[name]
        # Compute in the adapter's dtype (peft keeps adapters in fp32 over a half-precision base).
        h = self._cast_input_dtype(h, down.weight.dtype)
        act = NON_LINEARITIES[self.bottleneck_non_linearity[name]]
        return self.bottleneck_scaling[name] * up(act(down(self.bottleneck_dropout[name](h))))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            source = x if self.bottleneck_placement[name] == "parallel" else result
            result = result + self._adapter_output(name, source).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible: the adapter is non-linear.

        Raises:
            ValueError: always.
        """
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing to do: a bottleneck adapter is never merged."""

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """Injects :class:`BottleneckLayer` into a model (build it with ``peft.get_peft_model``).

    Example:
        >>> model = get_peft_model(base, BottleneckConfig(placement="serial", task_type="CAUSAL_LM"))
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    # The default targets live in BottleneckConfig; an explicit target_modules=None is an error.
    # (peft only reads this mapping, so the shared empty dict is safe.)
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        check_target_modules_present(peft_config, model)

    def _check_merge_allowed(self) -> None:
        # Fail before touching any layer (merge_adapter / merge_and_unload call this first).
        raise ValueError(
            "bottleneck adapters are non-linear and cannot be merged into the base weights; "
            "use unload() to remove them, or keep the PeftModel"
        )

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
        wrap_target(self, BottleneckLayer, BottleneckConfig, "a bottleneck", peft_config, adapter_name, target, target_name, parent,
                    current_key)
