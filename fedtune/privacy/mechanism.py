"""The DP-FedAvg Gaussian mechanism: clip each client's update, noise the cohort's sum once.

McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (central DP at the client level). Each client's update is scaled to L2 norm at most ``C``
(`clip_update`), so adding or removing one client changes the sum by at most ``C``. The sum gets
Gaussian noise with std ``z * C`` once (`add_gaussian_noise`), which is all the accountant needs.
Only the sum is touched, so this composes with secure aggregation: clients clip before masking and
the coordinator noises the unmasked sum (it is trusted to add the noise; clients are not asked to).

The coordinator then divides by a fixed denominator, the planned cohort size ``n``:
``mean = noised_sum / n``, not by the number of updates that actually arrived. A data-dependent
denominator would itself leak who took part and would break the ``C / n`` sensitivity of the mean;
with a fixed one, dropouts only lose signal, never privacy.
"""

from __future__ import annotations

import math

import torch

from fedtune.errors import InvalidInput


def global_l2_norm(delta: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of an update taken together, as if flattened into one vector.

    Accumulated in float64 so that half-precision updates neither overflow nor lose the small terms.

    Args:
        delta: Parameter name to update tensor (floating point).

    Returns:
        The norm; 0 for an empty update, and possibly inf or nan if a tensor holds such values.

    Raises:
        InvalidInput: If a tensor is not floating point.
    """
    total = 0.0
    for name, t in delta.items():
        if not t.is_floating_point():
            raise InvalidInput(f"update tensor {name!r} must be floating point, got {t.dtype}")
        total += float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_update(delta: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scales an update down to global L2 norm ``max_norm`` if it is longer; leaves it alone if not.

    The norm is taken over all tensors together (per-client clipping in DP-FedAvg), so the direction
    of the update is kept and only its length bounded.

    Args:
        delta: Parameter name to update tensor (floating point).
        max_norm: The clip norm ``C``, a finite number > 0.

    Returns:
        ``(clipped, norm)``: a new dict (the same tensors, uncopied, when no clipping was needed)
        and the update's norm before clipping, which callers may log or histogram to tune ``C``.

    Raises:
        InvalidInput: If ``max_norm`` is out of range, a tensor is not floating point, or the
            update's norm is not finite (it cannot be bounded).
    """
    _check_max_norm(max_norm)
    norm = global_l2_norm(delta)
    if not math.isfinite(norm):
        raise InvalidInput(f"update has a non-finite L2 norm ({norm}); it holds inf or nan values")
    if norm <= max_norm:
        return dict(delta), norm
    scale = max_norm / norm
    return {name: t * scale for name, t in delta.items()}, norm


def add_gaussian_noise(
    summed: dict[str, torch.Tensor],
    noise_multiplier: float,
    max_norm: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Adds N(0, (noise_multiplier * max_norm)^2) to every element of the cohort's summed update.

    Call it once per round on the sum of clipped updates, never per client: the std is calibrated
    to the sum's sensitivity ``max_norm``. Divide the result by the fixed cohort size afterwards
    (see the module docstring).

    Args:
        summed: Parameter name to the summed clipped updates (floating point).
        noise_multiplier: ``z``, noise std over clip norm, a finite number >= 0 (0 adds nothing).
        max_norm: The clip norm ``C`` the updates were clipped to, > 0.
        generator: Source of randomness; torch's default one if None. Seed one only in tests:
            anyone who can predict the noise can subtract it.

    Returns:
        A new dict of new tensors, same dtypes and devices as ``summed``.

    Raises:
        InvalidInput: If ``noise_multiplier`` or ``max_norm`` is out of range, or a tensor is not
            floating point.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise InvalidInput(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    _check_max_norm(max_norm)
    std = noise_multiplier * max_norm
    if std == 0:
        return {name: t.clone() for name, t in summed.items()}
    out: dict[str, torch.Tensor] = {}
    # Sorted so that a seeded generator gives the same noise whatever order the dict was built in.
    for name in sorted(summed):
        t = summed[name]
        if not t.is_floating_point():
            raise InvalidInput(f"summed tensor {name!r} must be floating point, got {t.dtype}")
        # Sample in at least float32: bf16/fp16 Gaussian samples are too coarse in the tails.
        work = torch.promote_types(t.dtype, torch.float32)
        noise = torch.randn(t.shape, generator=generator, dtype=work, device=t.device)
        out[name] = (t.to(work) + noise * std).to(t.dtype)
    return {name: out[name] for name in summed}


def _check_max_norm(max_norm: float) -> None:
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise InvalidInput(f"max_norm (the clip norm) must be a finite number > 0, got {max_norm}")
