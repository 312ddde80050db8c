"""Fixed-point encoding of float vectors into Z_2^32, the ring the masks live in.

A client clips its update to ``[-clip, clip]``, multiplies by ``scale`` and rounds stochastically to
an integer, stored as uint32 (two's complement). Masked vectors are summed mod 2^32; as long as the
true integer sum stays inside the int32 range (see `max_scale`) the sum decodes exactly back to the
sum of the rounded values, so the only error is the rounding itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtune.errors import InvalidInput

# Sums live in int32 once reinterpreted: their magnitude must stay below this.
_INT32_LIMIT = 2**31 - 1


def max_scale(clip: float, n_clients: int) -> float:
    """The largest scale at which a sum of ``n_clients`` encoded vectors cannot wrap around.

    Stochastic rounding can move a value up to one unit past ``clip * scale``, so the bound keeps
    ``n_clients * (clip * scale + 1) <= 2^31 - 1`` (stricter than ``n * clip * scale < 2^31``).

    Args:
        clip: The clipping bound applied to every element, > 0.
        n_clients: How many encoded vectors may be summed, >= 1.

    Returns:
        The scale; any smaller positive scale is safe too.

    Raises:
        InvalidInput: If ``clip`` or ``n_clients`` is out of range.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise InvalidInput(f"clip must be a positive finite number, got {clip}")
    if n_clients < 1:
        raise InvalidInput(f"n_clients must be >= 1, got {n_clients}")
    per_client = _INT32_LIMIT // n_clients
    if per_client < 2:
        raise InvalidInput(f"n_clients={n_clients} leaves no room for any value in 32 bits")
    # One unit of headroom for rounding up, which also absorbs float error in clip * scale.
    return (per_client - 1) / clip


def encode(
    values: Any, clip: float, scale: float, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Clips, scales and stochastically rounds a float vector into uint32 (two's complement).

    The rounding is unbiased: each element rounds up with probability equal to its fractional part,
    so the expected encoded value is exactly ``clip(x) * scale``.

    Args:
        values: A 1-D float numpy array or torch tensor (flattened if it has more dimensions).
        clip: Elements are clipped to ``[-clip, clip]`` first.
        scale: Fixed-point scale, at most ``max_scale(clip, n_clients)`` for the sum to decode.
        rng: A numpy Generator, an int seed (for tests), or None for fresh OS entropy.

    Returns:
        A uint32 numpy vector of the same number of elements.

    Raises:
        InvalidInput: If the vector holds NaN or infinity, or ``clip * scale`` does not fit 31 bits.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidInput(f"scale must be a positive finite number, got {scale}")
    if scale > max_scale(clip, 1):
        raise InvalidInput(f"scale={scale} with clip={clip} does not fit a single value in 32 bits")
    if hasattr(values, "detach"):  # a torch tensor; torch stays an optional import here
        values = values.detach().cpu().numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise InvalidInput("vector to encode holds NaN or infinite values")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scaled = np.clip(x, -clip, clip) * scale
    low = np.floor(scaled)
    rounded = low + (generator.random(scaled.shape) < (scaled - low))
    return rounded.astype(np.int32).view(np.uint32)


def decode_sum(total: np.ndarray, scale: float) -> np.ndarray:
    """Decodes a mod-2^32 sum of encoded vectors back to floats.

    Error bound: if ``n`` vectors encoded with this ``scale`` were summed and ``scale <=
    max_scale(clip, n)``, every decoded element differs from the exact sum of the clipped float
    values by less than ``n / scale`` (each stochastic rounding moves a value by less than one unit).

    Args:
        total: uint32 vector, the sum of encoded vectors mod 2^32.
        scale: The scale the vectors were encoded with.

    Returns:
        A float64 vector (float32 would add rounding error comparable to the bound itself).

    Raises:
        InvalidInput: If ``total`` is not a uint32 vector.
    """
    if not (isinstance(total, np.ndarray) and total.dtype == np.uint32):
        raise InvalidInput(
            f"sum to decode must be a uint32 numpy array, got {getattr(total, 'dtype', total)}"
        )
    return total.view(np.int32).astype(np.float64) / scale
