"""Adapter deltas as one flat vector (what secure aggregation masks) and back.

Layout: every tensor flattened in sorted name order, then one element carrying the client's
weight, so the masked sum also yields the sum of weights and FedAvg's denominator stays hidden
per client. The weight element is stored as ``weight * clip`` so that it survives clipping.

torch is imported only where tensors are made: a coordinator's engine sizes vectors and unmasks
sums with numpy alone (the sum becomes tensors in the compute actor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def vector_len(schema: dict[str, tuple[int, ...]]) -> int:
    """Elements of the vector for an adapter with this schema (name -> shape)."""
    return sum(int(np.prod(shape)) for shape in schema.values()) + 1


def flatten(delta: dict[str, torch.Tensor], weight: float, clip: float) -> np.ndarray:
    """``[weight * delta..., weight * clip]`` as float64."""
    import torch

    parts = [delta[name].detach().to(torch.float64).reshape(-1).numpy() * weight for name in sorted(delta)]
    return np.concatenate([*parts, np.array([weight * clip])])


def unflatten_sum(total: np.ndarray, schema: dict[str, tuple[int, ...]], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """Splits a decoded sum into per-tensor sums of weighted deltas and the sum of weights."""
    import torch

    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(schema):
        size = int(np.prod(schema[name]))
        out[name] = torch.from_numpy(total[offset:offset + size].reshape(schema[name]).copy()).to(torch.float32)
        offset += size
    return out, float(total[offset]) / clip
