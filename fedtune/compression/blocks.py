"""Finding, replacing and renumbering the decoder blocks of a causal LM, for emulators.

An emulator (Offsite-Tuning) is the full model with some middle blocks dropped. The block list sits
at a different attribute path in each family, and a few things refer to a block by its position:
the attention's `layer_idx` (the KV-cache slot it reads and writes), the config's layer count, and,
where present, `config.layer_types` (which blocks use sliding-window attention; the KV cache and the
attention masks are built from it). `install_blocks` keeps all of them consistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedtune.errors import InvalidInput

# Attribute paths of the decoder block list, by family, in transformers 5.
BLOCK_PATHS: dict[str, str] = {
    "model.layers": "Llama, Mistral, Qwen2/3, Gemma/2/3, Phi-3 and alike",
    "transformer.h": "GPT-2",
    "model.decoder.layers": "OPT",
}


@dataclass(frozen=True, eq=False)
class BlockList:
    """Where a model keeps its decoder blocks, and the blocks it held when found.

    Attributes:
        path: Dotted attribute path from the model to the `nn.ModuleList`, e.g. "model.layers".
        count_attr: The config attribute holding the layer count ("num_hidden_layers", "n_layer").
        modules: The blocks, in order, as found.
        layer_types: `config.layer_types` as found, where the config has one.
    """

    path: str
    count_attr: str
    modules: tuple[nn.Module, ...]
    layer_types: tuple[str, ...] | None

    @property
    def layers_pattern(self) -> str:
        """The block list's own name ("layers", "h"): peft's `layers_pattern` for these blocks."""
        return self.path.rsplit(".", 1)[-1]

    def __len__(self) -> int:
        return len(self.modules)


def find_blocks(model: nn.Module) -> BlockList:
    """Finds the decoder block list of a Hugging Face causal LM.

    Args:
        model: A Llama-, Mistral-, Qwen2-, GPT-2- or OPT-style causal LM (any model whose blocks
            sit at one of `BLOCK_PATHS` works the same way).

    Returns:
        The block list.

    Raises:
        InvalidInput: No block list at a known path, no layer count in the config that matches
            it, or blocks that depend on their position in a way a shorter config cannot express.
    """
    arch = type(model).__name__
    config = getattr(model, "config", None)
    for path in BLOCK_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            break
    else:
        supported = "; ".join(f"{v} ({k})" for k, v in BLOCK_PATHS.items())
        raise InvalidInput(
            f"architecture {arch} is not supported: no decoder block list found (supported: {supported})"
        )
    if config is None:
        raise InvalidInput(f"architecture {arch} is not supported: it has no Hugging Face config")
    count_attr = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    count = getattr(config, count_attr, None)
    if count != len(layers):
        raise InvalidInput(
            f"architecture {arch} is not supported: config.{count_attr} is {count!r} "
            f"but {path} holds {len(layers)} blocks"
        )
    # GPT-2 can scale attention by 1/(layer_idx + 1), fixed when the model is built: a renumbered
    # block would compute something else after loading.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise InvalidInput(
            f"architecture {arch} with scale_attn_by_inverse_layer_idx=True is not supported: "
            "its blocks change when renumbered"
        )
    types = getattr(config, "layer_types", None)
    return BlockList(
        path=path,
        count_attr=count_attr,
        modules=tuple(layers),
        layer_types=tuple(types) if types is not None else None,
    )


def install_blocks(model: Any, found: BlockList, modules: Sequence[nn.Module],
                   layer_map: Sequence[int]) -> None:
    """Puts `modules` in place of the model's blocks and makes the config agree.

    Block i of the result stands for block `layer_map[i]` of `found`: its `layer_types` entry is
    taken from there, and its attention is renumbered to i (see `renumber_blocks`).

    Args:
        model: The model `found` came from (a `PreTrainedModel`).
        found: Its block list as found (the full model's).
        modules: The new blocks, in order.
        layer_map: For each new block, the index of the block in `found` it stands for.

    Raises:
        ValueError: `modules` and `layer_map` differ in length, or an index is out of range.
    """
    if len(modules) != len(layer_map):
        raise ValueError(f"{len(modules)} blocks but a layer_map of {len(layer_map)}")
    if any(not 0 <= j < len(found) for j in layer_map):
        raise ValueError(f"layer_map {list(layer_map)} points outside the {len(found)} blocks")
    parent_path, _, name = found.path.rpartition(".")
    setattr(_get_path(model, parent_path), name, nn.ModuleList(modules))
    renumber_blocks(modules)
    config = model.config
    setattr(config, found.count_attr, len(modules))
    if found.layer_types is not None:
        config.layer_types = [found.layer_types[j] for j in layer_map]


def renumber_blocks(modules: Sequence[nn.Module]) -> None:
    """Sets `layer_idx` of every submodule of block i to i.

    Attention layers read and write KV-cache slot `layer_idx` (Llama, Mistral, Qwen2 and OPT on
    `self_attn`, GPT-2 on `attn`); after dropping blocks the slots must be 0..n-1 again, or
    generation indexes past the cache. Loading a saved emulator numbers blocks afresh anyway; this
    is for the model in memory.

    Args:
        modules: The blocks, in their new order.
    """
    for i, block in enumerate(modules):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = i  # type: ignore[assignment]


def _get_path(obj: object, path: str) -> object:
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
