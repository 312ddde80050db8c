"""Plugging an adapter trained on an emulator into the full model (Offsite-Tuning's plug-in step).

The emulator keeps the full model's first and last blocks unchanged, so LoRA weights trained on
its adapter blocks apply to the same blocks of the full model; only the block indices differ
(emulator block i is full block ``layer_map[i]``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    import torch


def _index_re(layers_pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(^|\.)({re.escape(layers_pattern)})\.(\d+)\.")


def full_model_name(key: str, layer_map: list[int], layers_pattern: str) -> str:
    """An adapter tensor's name with its emulator block index replaced by the full model's.

    Raises:
        InvalidInput: the tensor is not inside a decoder block, or its block is not in the map.
    """
    match = _index_re(layers_pattern).search(key)
    if match is None:
        raise InvalidInput(f"adapter tensor {key!r} is not inside a {layers_pattern!r} block")
    idx = int(match.group(3))
    if idx >= len(layer_map):
        raise InvalidInput(f"adapter tensor {key!r} is in block {idx}, the emulator has {len(layer_map)}")
    return key[: match.start(3)] + str(layer_map[idx]) + key[match.end(3):]


def to_full_model(state: dict[str, torch.Tensor], layer_map: list[int], layers_pattern: str) -> dict[str, torch.Tensor]:
    """Renames adapter tensors from emulator block indices to full-model block indices.

    Raises:
        InvalidInput: a tensor is not inside a decoder block, or its block is not in the map.
    """
    return {full_model_name(key, layer_map, layers_pattern): value for key, value in state.items()}
