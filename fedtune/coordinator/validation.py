"""Checks an uploaded update against the job's adapter before anything is stored."""

from __future__ import annotations

import torch

from fedtune.compression.codecs import UpdateCodec
from fedtune.errors import InvalidInput


def validate_update(
    wire: dict[str, torch.Tensor],
    schema: dict[str, tuple[int, ...]],
    codec: UpdateCodec,
    max_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """Validates wire tensors and returns the decoded fp32 delta.

    Args:
        wire: Tensors as received.
        schema: Tensor name -> shape of the job's adapter.
        codec: The job's codec; its ``check`` knows which wire tensors each adapter tensor becomes.
        max_norm: Optional bound on the L2 norm of the whole delta.

    Raises:
        InvalidInput: naming the first tensor that is missing, unexpected, of the wrong shape or
            dtype, otherwise not in the codec's format, or not finite, or the norm when it is over
            the bound.
    """
    codec.check(wire, schema)
    delta = codec.decode(wire, schema)
    sq = 0.0
    for name, tensor in delta.items():
        if not torch.isfinite(tensor).all():
            raise InvalidInput(f"tensor {name!r} has non-finite values")
        sq += float(tensor.double().pow(2).sum())
    if max_norm is not None and sq**0.5 > max_norm:
        raise InvalidInput(f"update L2 norm {sq**0.5:.4g} is over the job's bound {max_norm:.4g}")
    return delta


def check_control(control: dict[str, torch.Tensor] | None, schema: dict[str, tuple[int, ...]], required: bool,
                  job_schema: dict[str, tuple[int, ...]]) -> None:
    """Checks a SCAFFOLD update's control-variate change: one fp32 tensor per tensor the update sends,
    of its shape and finite.

    Raises:
        InvalidInput: naming what is missing, unexpected, misshapen or not finite.
    """
    if control is None:
        if required:
            raise InvalidInput("update has no SCAFFOLD control variate (control/* tensors): the job's strategy "
                               "is scaffold")
        return
    if not required:
        raise InvalidInput("update carries control/* tensors, but the job's strategy is not scaffold")
    if any(schema[k] != job_schema.get(k) for k in schema):
        raise InvalidInput("scaffold needs every client at the job's LoRA rank (drop --max-rank)")
    missing = sorted(set(schema) - set(control))
    if missing:
        raise InvalidInput(f"control variate lacks tensor {missing[0]!r}")
    unexpected = sorted(set(control) - set(schema))
    if unexpected:
        raise InvalidInput(f"control variate has unexpected tensor {unexpected[0]!r}")
    for name, tensor in control.items():
        if tuple(tensor.shape) != tuple(schema[name]):
            raise InvalidInput(f"control variate tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(schema[name])}")
        if not torch.isfinite(tensor).all():
            raise InvalidInput(f"control variate tensor {name!r} has non-finite values")


def aggregate_client_evals(reports: list[tuple[int, str, int, dict[str, float]]]) -> dict[str, float]:
    """The example-weighted mean of each metric over the reports with examples, as ``clients_<metric>``,
    with ``clients_evaluated`` (reports with examples) and ``clients_eval_examples``."""
    import math

    counted = [(n, m) for _, _, n, m in reports if n > 0]
    out: dict[str, float] = {"clients_evaluated": float(len(counted)),
                             "clients_eval_examples": float(sum(n for n, _ in counted))}
    keys = sorted({k for _, m in counted for k in m if k.startswith("eval_")})
    for key in keys:
        pairs = [(n, m[key]) for n, m in counted if key in m]
        total = sum(n for n, _ in pairs)
        if total:
            out[f"clients_{key}"] = sum(n * v for n, v in pairs) / total
    if "clients_eval_loss" in out:
        out["clients_eval_ppl"] = math.exp(min(out["clients_eval_loss"], 50.0))
    return out
