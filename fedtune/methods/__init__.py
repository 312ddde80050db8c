"""PEFT methods by name: the registry behind a job spec's ``peft.method``.

Each method is one module here that registers a :class:`~fedtune.methods.base.PeftMethod`; the
round engine, the agent and the validator never name a method. Importing this package is
torch-free (options only); building a peft config imports peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.errors import InvalidInput
from fedtune.methods.base import MethodOptions, PeftMethod

if TYPE_CHECKING:
    from peft import PeftConfig

METHODS: dict[str, type[PeftMethod]] = {}


def register(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: makes a method available as ``peft.method: <cls.name>``."""
    if cls.name in METHODS:
        raise ValueError(f"PEFT method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[PeftMethod]:
    """A registered method by name.

    Raises:
        InvalidInput: naming the unknown method and the known ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidInput(f"unknown PEFT method {name!r}; known: {', '.join(METHODS)}") from None


def method_options(cfg: dict[str, Any]) -> tuple[type[PeftMethod], MethodOptions]:
    """A method and its validated options from a ``peft`` mapping (as a job spec or task carries it).

    Keys that only the coordinator adds for offsite tuning (``layers_to_transform``,
    ``layers_pattern``, ``tune``) and the client's own rank (``client_rank``) are not options.
    """
    from pydantic import ValidationError

    extra = {"layers_to_transform", "layers_pattern", "tune", "client_rank", "lora_aggregation"}
    raw = {k: v for k, v in cfg.items() if k not in extra}
    method = get_method(str(raw.get("method", "lora")))
    try:
        return method, method.options.model_validate({**raw, "method": method.name})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"peft.{loc}: {first['msg']}") from e


def config_for(cfg: dict[str, Any], rank: int | None = None) -> PeftConfig:
    """The peft config of a job's ``peft`` mapping (with its offsite block scope, if any).

    Args:
        cfg: The mapping a job's task carries (its spec's ``peft`` plus the coordinator's keys).
        rank: A LoRA client's own rank, below the job's (heterogeneous ranks); its alpha is
            scaled so that its update means what the job's factors mean.
    """
    method, opts = method_options(cfg)
    unresolved = [name for name, _ in method.default_targets if getattr(opts, name) is None]
    if unresolved:
        # A job's defaults are resolved from its base at creation; a config without them would
        # leave the modules to whatever peft guesses, differently per participant's version.
        raise InvalidInput(f"peft.{unresolved[0]} is not set: resolve the base family's default first "
                           "(PeftMethod.with_defaults)")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not method.blocks:
        raise InvalidInput(f"PEFT method {method.name} cannot be confined to chosen blocks")
    scope = {"layers": layers, "layers_pattern": cfg.get("layers_pattern")}
    if rank is not None and rank != getattr(opts, "r", rank):
        if not method.lora:
            raise InvalidInput(f"a client rank applies to LoRA only, not to {method.name}")
        if getattr(opts, "rank_pattern", None):
            raise InvalidInput("a client rank below the job's cannot be combined with the job's rank_pattern")
        return method.peft_config(opts, rank=rank, **scope)  # type: ignore[call-arg]
    return method.peft_config(opts, **scope)


def resolve_targets(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """A ``peft`` mapping with the module options it leaves None set to the base family's (what the
    coordinator stores at job creation), its other keys as given.

    Args:
        cfg: A ``peft`` mapping (a spec's, or a task's with the coordinator's keys).
        model_type: The base's ``config.model_type``.

    Raises:
        InvalidInput: see :meth:`PeftMethod.with_defaults`.
    """
    method, opts = method_options(cfg)
    resolved = method.with_defaults(opts, model_type)
    return {**cfg, **{name: getattr(resolved, name) for name, _ in method.default_targets}}


def method_of_config(adapter_config: dict[str, Any]) -> type[PeftMethod] | None:
    """The registered method of a saved ``adapter_config.json`` (by its peft_type), if any."""
    return METHODS.get(str(adapter_config.get("peft_type", "")).lower())


def _load_builtin() -> None:
    # Imported for their registration; each module is one method (or one family of prompts).
    from fedtune.methods import (  # noqa: F401
        adalora,
        bitfit,
        bottleneck,
        ia3,
        ln_tuning,
        loha,
        lokr,
        lora,
        prompts,
        vera,
    )


_load_builtin()

__all__ = ["METHODS", "MethodOptions", "PeftMethod", "config_for", "get_method", "method_of_config",
           "method_options", "register", "resolve_targets"]
