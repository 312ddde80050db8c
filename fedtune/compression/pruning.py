"""Unstructured pruning of an emulator's frozen middle blocks: magnitude and Wanda.

Magnitude pruning zeroes the smallest |W| of each weight matrix, as Offsite-Tuning's own
`magnitude_prune` does. Wanda (Sun et al. 2023, arXiv 2306.11695) scores weight W_ij by
|W_ij| * ||X_j||_2, the norm of input channel j over calibration tokens, and zeroes the lowest
scores within each output row. As in the Wanda reference code, blocks are pruned in order and
each block is calibrated on the outputs of the blocks pruned before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedtune.errors import InvalidInput

PRUNE_METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class PruneSpec:
    """A parsed `--prune` value.

    Attributes:
        method: "magnitude" or "wanda".
        sparsity: Fraction of each weight matrix (magnitude) or row (wanda) set to zero, in (0, 1).
    """

    method: str
    sparsity: float

    def __str__(self) -> str:
        return f"{self.method}:{self.sparsity:g}"


def parse_prune_spec(spec: str) -> PruneSpec:
    """Parses "magnitude:S" or "wanda:S".

    Args:
        spec: The spec, S a sparsity strictly between 0 and 1.

    Returns:
        The parsed spec.

    Raises:
        InvalidInput: The spec does not parse, names another method, or S is outside (0, 1).
    """
    method, sep, value = spec.partition(":")
    if not sep or method not in PRUNE_METHODS:
        raise InvalidInput(f"prune spec {spec!r} must be magnitude:S or wanda:S with S a sparsity in (0, 1)")
    try:
        sparsity = float(value)
    except ValueError as e:
        raise InvalidInput(f"prune spec {spec!r}: sparsity {value!r} is not a number") from e
    if not 0 < sparsity < 1:
        raise InvalidInput(f"prune spec {spec!r}: sparsity must be in (0, 1), got {sparsity:g}")
    return PruneSpec(method, sparsity)


def linear_layers(blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """The linear layers (`nn.Linear`, and GPT-2's transposed `Conv1D`) inside `blocks`."""
    return [m for block in blocks for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))]


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight).data


def _out_in(layer: nn.Module) -> torch.Tensor:
    # A view of the weight as (out_features, in_features); Conv1D stores (in, out).
    weight = _weight(layer)
    return weight.t() if isinstance(layer, Conv1D) else weight


def _accumulate_sq_norm(into: torch.Tensor) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float()
        into.add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0).to(into.device))
    return hook


@torch.no_grad()
def magnitude_prune(blocks: Sequence[nn.Module], sparsity: float) -> None:
    """Zeroes exactly `int(numel * sparsity)` smallest-magnitude weights of each linear layer.

    Args:
        blocks: The blocks to prune, in place.
        sparsity: Fraction in (0, 1).
    """
    for layer in linear_layers(blocks):
        flat = _weight(layer).view(-1)
        n = int(flat.numel() * sparsity)
        if n:
            flat[torch.topk(flat.abs(), n, largest=False).indices] = 0


class _StopForward(Exception):
    """Ends a calibration forward once the block being calibrated has run."""


@torch.no_grad()
def wanda_prune(model: nn.Module, blocks: Sequence[nn.Module], sparsity: float,
                calibration: Sequence[torch.Tensor]) -> None:
    """Prunes each linear layer of `blocks` row by row by |W| * ||X||, calibrating on `model`.

    Args:
        model: A causal LM in which `blocks` are installed; it runs on `calibration` once per block.
        blocks: The blocks to prune, in place, in forward order.
        sparsity: Fraction of each output row set to zero, in (0, 1).
        calibration: Token id tensors of shape (1, T), each run unpadded.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    for block in blocks:
        layers = linear_layers([block])
        sq_norms = [torch.zeros(_out_in(layer).shape[1], dtype=torch.float32, device=_weight(layer).device)
                    for layer in layers]

        def stop(*_: object) -> None:
            raise _StopForward

        handles = [layer.register_forward_pre_hook(_accumulate_sq_norm(sq)) for layer, sq in zip(layers, sq_norms)]
        handles.append(block.register_forward_hook(stop))
        try:
            for input_ids in calibration:
                try:
                    model(input_ids=input_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        for layer, sq in zip(layers, sq_norms):
            weight = _out_in(layer)
            score = weight.abs().float() * sq.sqrt()[None, :]
            n = int(weight.shape[1] * sparsity)
            if n:
                mask = torch.ones_like(weight, dtype=torch.bool)
                mask.scatter_(1, torch.topk(score, n, dim=1, largest=False).indices, False)
                weight.mul_(mask)
    model.train(was_training)


def zero_fraction(blocks: Sequence[nn.Module]) -> float:
    """Fraction of exactly-zero entries over the linear weights of `blocks` (0.0 when none)."""
    weights = [_weight(layer) for layer in linear_layers(blocks)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0
