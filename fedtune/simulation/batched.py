"""Batched virtual clients: K cohort members in one Ray task, their adapters trained in one pass.

Each member is still a whole client agent (its own identity, channel, data, state dir, packing,
envelope and SecAgg+ session), run in a thread of the task; only the local training step is shared.
The members hand their training to a :class:`GroupTrainer`, which waits until every member has
asked (or left, or ``wait_seconds`` passed) and trains the adapters that share a model together
with :func:`fedtune.batching.train_batched`: one forward and backward of the frozen base per step,
each member's samples routed to its own adapter, its own optimizer and batch order. With LoRA
dropout 0 the weights equal the member's own local loop's; what cannot be batched (a quantized
base, another adapter kind, a lone member) trains with the agent's own loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.client.agent import ClientAgent, Prepared, train_seed
from fedtune.client.channel import INSECURE
from fedtune.methods.lora import plain_lora
from fedtune.protos import fedtune_pb2 as pb
from fedtune.simulation.shared_model import PREPARED, SHARED
from fedtune.training import Recipe, TrainResult

log = logging.getLogger(__name__)

Trained = tuple[TrainResult, dict[str, torch.Tensor]]
DEFAULT_WAIT_SECONDS = 30.0


@dataclass(eq=False)  # compared by identity: its fields hold tensors
class TrainRequest:
    """One member's training step, handed to its group."""

    member: str
    prepared: Prepared
    global_state: dict[str, torch.Tensor]
    round: int
    device: torch.device
    alone: Callable[[], Trained]  # the agent's own loop, for what cannot be batched
    recipe: Recipe | None = None  # the agent's recipe of the round (None: not batchable)
    taken: bool = False
    done: Future[Trained] = field(default_factory=Future)


def batch_key(req: TrainRequest) -> tuple[str, str] | None:
    """Requests with equal keys train in one pass; None: this one trains alone."""
    p = req.prepared
    if p.training.get("client_quantization") or not plain_lora(p.peft_config):
        return None  # e.g. offsite.tune: blocks trains whole blocks, another method, a LoRA variant
    if req.recipe is None or not req.recipe.batchable:
        return None  # the shared pass has no micro-batches, checkpointing or autocast
    if p.tokenized and "position_ids" in p.tokenized[0]:
        return None  # packed rows carry their own positions, which the shared pass does not route
    return p.base_hash, str(req.device)


class GroupTrainer:
    """Collects a group's training steps and runs them together."""

    def __init__(self, members: list[str], wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        """Args:
            members: The members' names; the group waits for each of them to ask or leave.
            wait_seconds: Longest wait after a member asks before training without the rest.
        """
        self.members = set(members)
        self.wait_seconds = wait_seconds
        self._pending: list[TrainRequest] = []
        self._left: set[str] = set()
        self._trained: set[str] = set()
        self._cond = threading.Condition()
        self.passes: list[int] = []  # members per shared pass, for tests and logs

    def _ready(self) -> bool:
        waiting_for = self.members - self._left - self._trained
        return {r.member for r in self._pending} >= waiting_for

    def leave(self, member: str) -> None:
        """A member will ask for nothing more (its agent has stopped)."""
        with self._cond:
            self._left.add(member)
            self._cond.notify_all()

    def train(self, req: TrainRequest) -> Trained:
        """Trains ``req`` with the others of its group; blocks until its result is there."""
        with self._cond:
            self._trained.discard(req.member)
            self._pending.append(req)
            self._cond.notify_all()
            deadline = time.monotonic() + self.wait_seconds
            while not req.taken and not self._ready() and time.monotonic() < deadline:
                self._cond.wait(timeout=0.5)
            batch: list[TrainRequest] = []
            if not req.taken:
                batch, self._pending = self._pending, []
                for r in batch:
                    r.taken = True
                self._trained |= {r.member for r in batch}
        if batch:
            self._run(batch)
        return req.done.result()

    def _run(self, batch: list[TrainRequest]) -> None:
        groups: dict[tuple[str, str], list[TrainRequest]] = {}
        alone: list[TrainRequest] = []
        for r in batch:
            key = batch_key(r)
            if key is None:
                alone.append(r)
            else:
                groups.setdefault(key, []).append(r)
        for members in groups.values():
            if len(members) == 1:
                alone.extend(members)
                continue
            try:
                for r, result in zip(members, _train_together(members), strict=True):
                    r.done.set_result(result)
                self.passes.append(len(members))
            except Exception as e:  # noqa: BLE001 - each member hears of it, as its own loop's error
                for r in members:
                    r.done.set_exception(e)
        for r in alone:
            try:
                r.done.set_result(r.alone())
            except Exception as e:  # noqa: BLE001 - as above
                r.done.set_exception(e)


def _train_together(members: list[TrainRequest]) -> list[Trained]:
    """Trains the members' adapters in shared passes over one freshly loaded base."""
    from fedtune.batching import AdapterSpec, TrainingPlan, train_batched
    from fedtune.models import load_causal_lm
    from fedtune.peft_io import lora_config

    first = members[0].prepared
    device = members[0].device
    if (first.model_dir / "emulator.json").exists():
        from fedtune.compression.emulator_storage import load_emulator

        base = load_emulator(first.model_dir, device)
    else:
        base = load_causal_lm(first.model_dir, device)
    adapters, plans = [], []
    for r in members:
        c, t = r.prepared.peft_config, r.prepared.training
        config = lora_config(c["r"], c["alpha"], c["dropout"], c["target_modules"], c.get("layers_to_transform"),
                             c.get("layers_pattern"))
        adapters.append(AdapterSpec(first.base_hash, config, state=r.global_state))
        plans.append(TrainingPlan(r.prepared.tokenized, float(t["lr"]), int(t["batch_size"]), steps=t.get("steps"),
                                  epochs=t.get("epochs"), seed=train_seed(t, r.round),
                                  recipe=r.recipe or Recipe()))
    runs = train_batched(base, first.base_hash, adapters, plans, pad_id=first.pad_id, device=device)
    log.info("trained %d virtual clients' adapters in one pass of the base", len(members))
    return [(run.result, run.state) for run in runs]


class BatchedAgent(ClientAgent):
    """A virtual client whose training step is its group's.

    What it trains alone, it trains on its worker process's shared model
    (:mod:`fedtune.simulation.shared_model`): the virtual client before it loaded the base.
    """

    def __init__(self, group: GroupTrainer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _prepare(self, stub: Any, task: pb.Task) -> Prepared:
        # A client back on a worker that ran it before finds its tokenized data there, as an agent
        # that stayed up would (ClientAgent._prepare reuses what is prepared for the same base).
        if self._prepared is None:
            self._prepared = PREPARED.get(str(self.state_dir), task.base_model_hash)
        prepared = ClientAgent._prepare(self, stub, task)
        if self._prepared is not None:
            PREPARED.put(str(self.state_dir), self._prepared)
        return prepared

    def _peft_model(self, prepared: Prepared) -> Any:
        # Everything ClientAgent._peft_model's build reads, except the per-client paths of the same files.
        t = prepared.training
        key = {"base": prepared.base_hash, "peft": prepared.peft_config, "device": str(self.device),
               "max_rank": self.max_rank, "quantize": t.get("client_quantization"),
               "precision": t.get("precision", "auto")}
        return SHARED.get(key, lambda: ClientAgent._peft_model(self, prepared))

    def evaluate_held_out(self, prepared: Prepared, global_state: dict[str, torch.Tensor],
                          evaluation: dict[str, Any]) -> tuple[dict[str, float], int]:
        with SHARED.lock:
            return ClientAgent.evaluate_held_out(self, prepared, global_state, evaluation)

    def _train(self, prepared: Prepared, global_state: dict[str, torch.Tensor], task: pb.Task,
               stub: Any = None) -> tuple[TrainResult, dict[str, torch.Tensor], Any]:
        assert self.name is not None
        if prepared.training.get("strategy"):
            # A client-side strategy (FedProx, SCAFFOLD) hooks every step of the agent's own loop.
            with SHARED.lock:
                return ClientAgent._train(self, prepared, global_state, task, stub)

        def alone() -> Trained:
            with SHARED.lock:
                result, state, _ = ClientAgent._train(self, prepared, global_state, task, stub)
            return result, state

        result, state = self.group.train(TrainRequest(self.name, prepared, global_state, task.round, self.device,
                                                      alone=alone, recipe=self.recipe(prepared, task)))
        return result, state, None


def run_group(address: str, members: list[tuple[str, str]], idle_seconds: float) -> dict[str, Any]:
    """Runs one round for each member (data file, state dir), their training shared; one Ray task's body.

    Returns:
        ``members``: per member, the rounds it uploaded for and its bytes up and down (or its
        error); ``passes``: how many members each shared training pass held.
    """
    names = [Path(state_dir).name for _, state_dir in members]
    group = GroupTrainer(names)
    out: list[dict[str, Any]] = [{} for _ in members]

    def member(i: int, data: str, state_dir: str) -> None:
        try:
            agent = BatchedAgent(group, address, None, Path(data), Path(state_dir), INSECURE, device="auto",
                                 name=names[i], progress=False)
            stats = agent.run(max_tasks=1, idle_seconds=idle_seconds)
            out[i] = {"rounds": stats.rounds, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down}
        except Exception as e:  # noqa: BLE001 - one member failing is that client's dropout, not the group's
            log.warning("virtual client %s failed: %s", names[i], e)
            out[i] = {"error": str(e)}
        finally:
            group.leave(names[i])

    if len(members) == 1:  # a lone member runs in the worker's own thread
        member(0, *members[0])
        return {"members": out, "passes": list(group.passes)}
    threads = [threading.Thread(target=member, args=(i, d, s), name=f"vclient-{names[i]}", daemon=True)
               for i, (d, s) in enumerate(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"members": out, "passes": list(group.passes)}
