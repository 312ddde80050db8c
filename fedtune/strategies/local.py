"""The client's side of client-side strategies: what the training loop adds to each step.

A task names its strategy in ``training_json["strategy"]`` (:meth:`Strategy.client_options`);
:func:`local_objective` turns that into a :class:`LocalObjective` that
:func:`fedtune.training.train_adapter` calls around every optimizer step:

- FedProx: ``grad += mu · (w - w_start)`` before clipping (the gradient of ``mu/2 ‖w - w_start‖²``),
  where ``w_start`` is the adapter the round started from (the global one).
- SCAFFOLD: ``w -= lr_t · (c - c_i)`` after each step, and at the end the client's new variate
  ``c_i⁺ = c_i - c + (w_start - w_end) / Σ_t lr_t`` (option II of the paper).

The parameters are matched to the adapter's named tensors by storage, so the variates have the
names and shapes that :func:`fedtune.peft_io.adapter_state` gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import InvalidInput
from fedtune.strategies.scaffold import CONTROL_PREFIX, STATE_PREFIX


class LocalObjective:
    """Hooks of one client-side strategy in one round's training loop (the base: none)."""

    named: dict[str, torch.nn.Parameter]

    def begin(self, named: dict[str, torch.nn.Parameter]) -> None:
        """Called once, before the first step, with the trainable parameters by adapter-state name
        (holding the adapter the round starts from)."""
        self.named = named

    def before_clip(self) -> None:
        """After the batch's backward pass, before gradient clipping and the optimizer step."""

    def after_step(self, lr: float) -> None:
        """After the optimizer step, with the step's learning rate."""


@dataclass
class FedProxObjective(LocalObjective):
    """FedProx's proximal gradient ``mu · (w - w_start)``."""

    mu: float
    start: dict[str, torch.Tensor] = field(default_factory=dict)

    def begin(self, named: dict[str, torch.nn.Parameter]) -> None:
        super().begin(named)
        self.start = {k: p.detach().clone() for k, p in named.items()}

    def before_clip(self) -> None:
        if self.mu == 0:
            return
        with torch.no_grad():
            for k, p in self.named.items():
                prox = self.mu * (p.detach() - self.start[k])
                p.grad = prox.to(p.dtype) if p.grad is None else p.grad + prox.to(p.grad.dtype)


@dataclass
class ScaffoldObjective(LocalObjective):
    """SCAFFOLD's drift correction with the server variate ``c`` and the client's ``c_i``."""

    server: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor]
    start: dict[str, torch.Tensor] = field(default_factory=dict)
    lr_sum: float = 0.0

    def begin(self, named: dict[str, torch.nn.Parameter]) -> None:
        super().begin(named)
        self.start = {k: p.detach().clone() for k, p in named.items()}
        self.lr_sum = 0.0

    def correction(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        c, ci = self.server.get(name), self.own.get(name)
        if c is None and ci is None:
            return None
        zero = torch.zeros_like(like, dtype=torch.float32)
        return (c if c is not None else zero).to(like.device) - (ci if ci is not None else zero).to(like.device)

    def after_step(self, lr: float) -> None:
        self.lr_sum += lr
        with torch.no_grad():
            for k, p in self.named.items():
                corr = self.correction(k, p)
                if corr is not None:
                    p.sub_((lr * corr).to(p.dtype))

    def new_variate(self, trained: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """``c_i⁺`` over ``names`` (the tensors the update sends), from the trained adapter."""
        if self.lr_sum <= 0:
            raise InvalidInput("SCAFFOLD needs at least one optimizer step with a positive learning rate")
        out = {}
        for k in names:
            start = self.start.get(k)
            if start is None:
                continue  # not trained here (ffa's frozen A): its variate stays 0
            ci = self.own.get(k, torch.zeros_like(trained[k]))
            c = self.server.get(k, torch.zeros_like(trained[k]))
            out[k] = (ci - c + (start.cpu().float() - trained[k].float()) / self.lr_sum).contiguous()
        return out


def named_trainable(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Parameter], list[str]]:
    """The model's trainable parameters keyed by their adapter-state names (matched by storage with
    peft's state dict), and the names of those peft does not save as they are (prompt tuning saves
    its embeddings computed, not the parameters that train)."""
    from fedtune.peft_io import live_adapter_state

    by_ptr = {t.data_ptr(): k for k, t in live_adapter_state(model).items()}  # type: ignore[arg-type]
    named, unmatched = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.data_ptr() in by_ptr:
            named[by_ptr[p.data_ptr()]] = p
        else:
            unmatched.append(name)
    return named, unmatched


def begin(objective: LocalObjective, model: torch.nn.Module) -> None:
    """Gives ``objective`` the model's trainable parameters (holding the round's start).

    Raises:
        InvalidInput: SCAFFOLD on a method whose trained tensors peft does not save as they are.
    """
    named, unmatched = named_trainable(model)
    if isinstance(objective, ScaffoldObjective):
        if unmatched:
            raise InvalidInput(f"scaffold: peft does not save the trained parameter {unmatched[0]} as it is, so "
                               "no control variate can follow it; use fedprox or fedavg with this method")
        objective.begin(named)
        return
    # FedProx needs no names: every trainable parameter, by the model's own name where peft's differs.
    objective.begin({**named, **{n: p for n, p in model.named_parameters() if n in set(unmatched)}})


def local_objective(training: dict[str, Any], server_state: dict[str, torch.Tensor] | None,
                    own_path: Path | None) -> LocalObjective | None:
    """The task's client-side strategy, or None for plain local training.

    Raises:
        InvalidInput: a strategy this agent does not know (a newer coordinator's).
    """
    spec = training.get("strategy")
    if not spec:
        return None
    name = spec.get("name")
    if name == "fedprox":
        return FedProxObjective(float(spec["mu"]))
    if name == "scaffold":
        server = {k[len(STATE_PREFIX):]: v.float() for k, v in (server_state or {}).items()
                  if k.startswith(STATE_PREFIX)}
        own: dict[str, torch.Tensor] = {}
        if own_path is not None and own_path.exists():
            from safetensors.torch import load_file

            own = load_file(str(own_path))
        return ScaffoldObjective(server, own)
    raise InvalidInput(f"the task asks for client-side strategy {name!r}, which this agent does not run; "
                       "upgrade fedtune on this client")


def control_tensors(change: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A variate change as the update blob's extra tensors (``control/<name>``, fp32)."""
    return {CONTROL_PREFIX + k: v.float().contiguous() for k, v in change.items()}
