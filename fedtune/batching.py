"""Batched multi-adapter training and evaluation: K LoRA adapters over one frozen base, one pass.

When several adapters share a base (jobs on one coordinator, virtual clients of a simulation),
training them one after the other runs the frozen base K times. Here the K mini-batches are
concatenated into one batch; the base runs once forward and once backward, and every LoRA-targeted
Linear adds to each adapter's rows (a contiguous segment of the batch) only that adapter's
``B(A(x)) * scale`` -- the BatchLoRA idea of mLoRA/ASPEN. Each adapter keeps its own optimizer,
gradient clipping, batch order and loss, so the result is what isolated training would give.

The adapters live in one peft model as named adapters (``fedtune_batch_000``, ...), so their weights
carry peft's own keys and move with peft's state-dict functions; what is ours is the routing:
peft's layers run with no active adapter (base output only) and a forward hook on each adds the
segments' deltas. peft's own mixed-batch path (``adapter_names=``) is refused in training mode.
Serving (`fedtune.serving.engine`) routes the same way row by row (`MultiLoraModel.route_rows`),
adding and removing adapters while it runs.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from fedtune.data import IGNORE_INDEX, collate
from fedtune.errors import InvalidInput
from fedtune.models import MODEL_BUILD_LOCK

# The isolated loop's batch order, step count and clip norm, reused so both agree exactly.
from fedtune.training import Recipe, TrainResult, _batches, _cuda_devices, count_steps

logger = logging.getLogger(__name__)

Tokenized = Sequence[dict[str, list[int]]]


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a batched model.

    Attributes:
        base: Identity of the base model the adapter is for (a content hash or a name); every
            adapter of a batch must name the model's.
        config: Its LoRA config, e.g. from `fedtune.peft_io.lora_config` (plain LoRA on Linear layers).
        state: Starting weights keyed as `fedtune.peft_io.adapter_state` returns them; None starts
            from peft's fresh init seeded by `init_seed`, as `build_peft_model(seed=init_seed)` does.
        init_seed: Seed of the fresh init when `state` is None.
    """

    base: str
    config: LoraConfig
    state: Mapping[str, torch.Tensor] | None = None
    init_seed: int = 0


@dataclass(frozen=True)
class TrainingPlan:
    """How to train one adapter of a batch: the settings of `fedtune.training.train_adapter`.

    Attributes:
        examples: Items from `fedtune.data.tokenize`.
        lr: AdamW learning rate.
        batch_size: Examples per step (this adapter's segment of the shared batch).
        steps: Exact number of optimizer steps; takes precedence over `epochs`.
        epochs: Passes over the data when `steps` is None; rounded up to whole steps.
        seed: Seed of the batch order.
        recipe: Its schedule, weight decay and clipping (`fedtune.training.Recipe`); accumulation,
            checkpointing and half precision are not batched (such clients train alone).
    """

    examples: Tokenized
    lr: float
    batch_size: int
    steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)


@dataclass(frozen=True)
class BatchedRun:
    """One adapter's outcome of `train_batched`.

    Attributes:
        result: Its summary; `seconds` is the shared loop's wall time.
        state: Its trained weights, keyed as `fedtune.peft_io.adapter_state` returns them.
    """

    result: TrainResult
    state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Segment:
    name: str
    start: int
    stop: int


class MultiLoraModel:
    """One frozen causal LM with K LoRA adapters, each sample of a batch routed to its own.

    The base model is modified in place (peft injects its layers), as `build_peft_model` does.
    Adapters may differ in rank, alpha, dropout and target modules. Training and evaluation route
    contiguous segments of a batch (`token_loss_sums`); serving routes any row to any adapter
    (`route_rows`) and adds and removes adapters while it runs (`add_adapter`, `remove_adapter`).
    """

    def __init__(self, base_model: PreTrainedModel, base: str, adapters: Sequence[AdapterSpec], *,
                 name_width: int | None = None) -> None:
        """Wraps `base_model` with the adapters.

        Args:
            base_model: A causal LM, e.g. from `fedtune.models.load_causal_lm`.
            base: Its identity; every adapter's `base` must equal it.
            adapters: The adapters, in the order used by every other method.
            name_width: Digits of the internal adapter names; adapters added later need room
                (at most ``10**name_width`` adapters over the model's life).

        Raises:
            InvalidInput: No adapters, an adapter for another base, an unsupported config, no
                matching module, or a starting state that does not fit.
        """
        if not adapters:
            raise InvalidInput("no adapters to batch")
        self._base_id = base
        for k, spec in enumerate(adapters):
            self._check_spec(k, spec)
        # Equal-length names: peft picks an adapter's keys by substring, so none may contain another.
        self._width = name_width or max(3, len(str(len(adapters) - 1)))
        self._next_id = len(adapters)
        self.names = [self._name(k) for k in range(len(adapters))]
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with warnings.catch_warnings():
            # peft reads a property transformers 5 deprecated; users cannot act on the warning.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft: PeftModel | None = None
            for k, (name, spec) in enumerate(zip(self.names, adapters, strict=True)):
                # Seeded as build_peft_model seeds, without touching the caller's global RNG.
                with MODEL_BUILD_LOCK, torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(spec.init_seed)
                    try:
                        # A copy: peft writes the base's name into the config it is given.
                        config = copy.deepcopy(spec.config)
                        if peft is None:
                            peft = get_peft_model(base_model, config, adapter_name=name)
                        else:
                            peft.add_adapter(name, config)
                    except ValueError as e:
                        raise InvalidInput(f"cannot add LoRA adapter {k} to the base model: {e}") from e
        assert peft is not None
        self.peft_model = peft
        peft.train(base_model.training)  # keep the base's mode (eval from load_causal_lm)
        # The injected transformers model, called directly: PeftModel's forward adds nothing here.
        self._lm: Any = peft.base_model.model
        # Any: peft types its layers' ModuleDicts as tensors or modules.
        self._layers: list[Any] = []
        self._hooked: set[int] = set()
        self._attach_layers()
        self._params = [self._adapter_params(name) for name in self.names]
        for params in self._params:
            for p in params:
                p.requires_grad_(True)
        self._segments: list[_Segment] | None = None
        # Row routing (serving): each row's slot (0 = base only, k + 1 = adapter k) and, when all
        # rows share one slot, that slot; per layer, every adapter's weights stacked by slot.
        self._rows: tuple[torch.Tensor, int | None, tuple[int, ...]] | None = None
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]] | None] = {}
        # Per layer, the stacks gathered for the last row assignment: decode steps reuse them until
        # rows join or leave (gathering costs several times the products themselves on a CPU).
        self._gathered: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for k, spec in enumerate(adapters):
            if spec.state is not None:
                self.load_state(k, spec.state)

    def _name(self, k: int) -> str:
        return f"fedtune_batch_{k:0{self._width}d}"

    def _check_spec(self, k: int, spec: AdapterSpec) -> None:
        if spec.base != self._base_id:
            raise InvalidInput(
                f"adapter {k} is for base {spec.base!r} but the model is {self._base_id!r}; "
                "only adapters of one base can share a batch"
            )
        if not isinstance(spec.config, LoraConfig):
            raise InvalidInput(f"adapter {k}: batched training supports LoRA only, got {type(spec.config).__name__}")
        if spec.config.use_dora or spec.config.lora_bias:
            raise InvalidInput(f"adapter {k}: batched training supports plain LoRA, not DoRA or LoRA bias")

    def _attach_layers(self) -> None:
        """Checks peft's layers that hold adapters, deactivates them and hooks the routing on each once."""
        layers = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            if not (set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))):
                continue  # left behind by a removed adapter: adds nothing
            if not isinstance(layer, LoraLinear):
                raise InvalidInput(
                    f"batched training adapts Linear layers only; a target is a {type(layer.base_layer).__name__}"
                )
            if layer.lora_variant:
                raise InvalidInput("batched training supports plain LoRA, not LoRA variants")
        for layer in layers:
            # No active adapter: peft's forward yields the base output and our hook adds the deltas.
            # (peft re-activates its default adapter whenever one is added or deleted.)
            layer.set_adapter([])
            if isinstance(layer, LoraLinear) and id(layer) not in self._hooked:
                layer.register_forward_hook(self._route)
                self._hooked.add(id(layer))
        self._layers = [m for m in layers if isinstance(m, LoraLinear)]

    def add_adapter(self, spec: AdapterSpec) -> str:
        """Adds an adapter after construction; a rejected one leaves the model as it was.

        Args:
            spec: The adapter, with its weights in `state` (or peft's fresh init seeded by `init_seed`).

        Returns:
            Its internal name, for `route_rows` and `remove_adapter`; its index is the new last one.

        Raises:
            InvalidInput: See the constructor; or no room is left in the names (`name_width`).
        """
        k = len(self.names)
        self._check_spec(k, spec)
        if self._next_id >= 10**self._width:
            raise InvalidInput(f"this model has held {self._next_id} adapters, the most its names allow")
        name = self._name(self._next_id)
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with warnings.catch_warnings(), MODEL_BUILD_LOCK, torch.random.fork_rng(devices=cuda):
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(spec.init_seed)
            try:
                self.peft_model.add_adapter(name, copy.deepcopy(spec.config))
            except ValueError as e:
                raise InvalidInput(f"cannot add LoRA adapter {k} to the base model: {e}") from e
        self._next_id += 1
        self.names.append(name)
        try:
            self._attach_layers()
            self._params.append(self._adapter_params(name))
            if spec.state is not None:
                self.load_state(k, spec.state)
        except InvalidInput:
            self.remove_adapter(name)
            raise
        self._stacks.clear()
        self._gathered.clear()
        return name

    def remove_adapter(self, name: str) -> None:
        """Deletes an adapter by its internal name; the indices of those after it move down by one.

        Raises:
            InvalidInput: No adapter has this name.
        """
        if name not in self.names:
            raise InvalidInput(f"no adapter named {name!r} in this model")
        k = self.names.index(name)
        self.peft_model.delete_adapter(name)
        del self.names[k]
        if k < len(self._params):
            del self._params[k]
        self._attach_layers()
        self._stacks.clear()
        self._gathered.clear()

    @contextmanager
    def route_rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row i of every forward pass goes through adapter ``names[i]``.

        Rows may come in any order and mix adapters freely (None: the base alone). Each
        LoRA-targeted Linear adds ``x @ A_i @ B_i * scale_i`` to row i of its base output, with
        every adapter's A and B stacked per layer (zero-padded to the layer's largest rank, zero for
        adapters that skip the layer) and gathered per row: one batched product per layer however
        many adapters the batch mixes, as Punica's BGMV and S-LoRA do.

        Raises:
            InvalidInput: A name is not one of this model's adapters.
        """
        slot_of = {name: k for k, name in enumerate(self.names, 1)}
        try:
            slots = [0 if name is None else slot_of[name] for name in names]
        except KeyError as e:
            raise InvalidInput(f"no adapter named {e.args[0]!r} in this model") from e
        uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        self._rows = (torch.tensor(slots), uniform, tuple(slots))
        try:
            yield
        finally:
            self._rows = None

    def _stack(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]] | None:
        """(A [slots, in, r], B [slots, r, out], scale [slots], scale as floats) of a layer, slot 0 zero."""
        key = id(layer)
        if key not in self._stacks:
            present = [(slot, name) for slot, name in enumerate(self.names, 1) if name in layer.lora_A]
            stack = None
            if present:
                rank = max(layer.r[name] for _, name in present)
                ref = layer.lora_A[present[0][1]].weight
                slots = len(self.names) + 1
                with torch.no_grad():
                    a = ref.new_zeros(slots, layer.in_features, rank)
                    b = ref.new_zeros(slots, rank, layer.out_features)
                    scale = [0.0] * slots
                    for slot, name in present:
                        r = layer.r[name]
                        a[slot, :, :r] = layer.lora_A[name].weight.detach().T
                        b[slot, :r, :] = layer.lora_B[name].weight.detach().T.to(b.dtype)
                        scale[slot] = float(layer.scaling[name])
                stack = (a, b, torch.tensor(scale, dtype=a.dtype), scale)
            self._stacks[key] = stack
        return self._stacks[key]

    def _route_rows(self, layer: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        assert self._rows is not None
        stack = self._stack(layer)
        if stack is None:
            return output
        a, b, scale, scale_values = stack
        slots, uniform, key = self._rows
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
        if uniform is not None:
            if scale_values[uniform] == 0.0:
                return output  # the base alone, or an adapter that skips this layer
            # peft's own order of operations: (x A) B, then the scale.
            delta = (h @ a[uniform]) @ b[uniform] * scale_values[uniform]
        else:
            gathered = self._gathered.get(id(layer))
            if gathered is None or gathered[0] != key:
                index = slots.to(a.device)
                gathered = (key, a.index_select(0, index), b.index_select(0, index),
                            scale.index_select(0, index).view(-1, 1, 1))
                self._gathered[id(layer)] = gathered
            _, a_rows, b_rows, scale_rows = gathered
            delta = torch.bmm(torch.bmm(h, a_rows), b_rows) * scale_rows
        output += delta.view(output.shape).to(output.dtype)
        return output

    def _adapter_params(self, name: str) -> list[torch.nn.Parameter]:
        params: list[torch.nn.Parameter] = []
        for layer in self._layers:
            if name in layer.lora_A:
                params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return params

    def _route(self, layer: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook: adds each segment's (or row's) own adapter delta to its rows of the base output."""
        if self._rows is not None:
            return self._route_rows(layer, args[0], output)
        if self._segments is None:
            raise RuntimeError("a MultiLoraModel runs only through its own methods, which route samples")
        x = args[0]
        for seg in self._segments:
            if seg.name not in layer.lora_A:
                continue  # this adapter does not target this module
            lora_a = layer.lora_A[seg.name]
            rows = layer.lora_dropout[seg.name](x[seg.start : seg.stop].to(lora_a.weight.dtype))
            delta = layer.lora_B[seg.name](lora_a(rows)) * layer.scaling[seg.name]
            # In place on a slice: the Linear that made `output` does not keep it for backward.
            output[seg.start : seg.stop] += delta.to(output.dtype)
        return output

    @property
    def num_adapters(self) -> int:
        """How many adapters the model holds."""
        return len(self.names)

    def parameters(self, k: int) -> list[torch.nn.Parameter]:
        """Adapter `k`'s trainable parameters."""
        return self._params[k]

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Adapter `k`'s weights as fp32 CPU copies, keyed exactly as `peft_io.adapter_state` keys them."""
        state = get_peft_model_state_dict(self.peft_model, adapter_name=self.names[k], save_embedding_layers=False)
        return {key: v.detach().to(device="cpu", dtype=torch.float32, copy=True) for key, v in state.items()}

    def gradients(self, k: int) -> dict[str, torch.Tensor]:
        """Adapter `k`'s current gradients (zeros where none), under the keys of `state`."""
        own = {id(p) for p in self._params[k]}
        grads = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu", torch.float32, copy=True)
            for n, p in self.peft_model.named_parameters()
            if id(p) in own
        }
        # peft maps parameter names to its saved keys; a dict of grads by parameter name maps the same way.
        return get_peft_model_state_dict(self.peft_model, state_dict=grads, adapter_name=self.names[k],
                                         save_embedding_layers=False)

    def load_state(self, k: int, state: Mapping[str, torch.Tensor]) -> None:
        """Writes weights into adapter `k`.

        Args:
            k: Which adapter.
            state: Tensors keyed as `state` returns them.

        Raises:
            InvalidInput: Keys or shapes differ from the adapter's, or a value is not finite.
        """
        expected = get_peft_model_state_dict(self.peft_model, adapter_name=self.names[k], save_embedding_layers=False)
        if expected.keys() != state.keys():
            odd = sorted(expected.keys() ^ state.keys())
            raise InvalidInput(f"adapter {k}: starting state does not fit its config (keys differ: {odd[:3]})")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise InvalidInput(f"adapter {k}: tensor {key} has shape {tuple(value.shape)}, "
                                   f"its config makes {tuple(expected[key].shape)}")
            if not torch.isfinite(value).all():
                raise InvalidInput(f"adapter {k}: tensor {key} holds NaN or infinite values")
        set_peft_model_state_dict(self.peft_model, dict(state), adapter_name=self.names[k])
        self._stacks.clear()
        self._gathered.clear()

    def train(self, mode: bool = True) -> None:
        """Sets train (dropout on) or eval mode."""
        self.peft_model.train(mode)

    @property
    def training(self) -> bool:
        """Whether the model is in train mode."""
        return bool(self.peft_model.training)

    def token_loss_sums(self, parts: Sequence[tuple[int, Tokenized]], pad_id: int,
                        device: torch.device) -> list[tuple[torch.Tensor, int]]:
        """One forward pass over several adapters' examples; per part, summed token loss and count.

        The loss is `fedtune.training`'s: next-token cross entropy over labelled positions, in fp32.

        Args:
            parts: (adapter index, its examples) pairs; an adapter may appear at most once.
            pad_id: Padding token id.
            device: Where the model is.

        Returns:
            Per part, in order: the summed loss (a graph to backpropagate through when grads are on)
            and the number of labelled tokens.
        """
        items: list[dict[str, list[int]]] = []
        segments: list[_Segment] = []
        for k, examples in parts:
            segments.append(_Segment(self.names[k], len(items), len(items) + len(examples)))
            items.extend(examples)
        # One right-padded batch: a sample's real tokens never attend to the padding after them.
        batch = {key: v.to(device) for key, v in collate(items, pad_id).items()}
        self._segments = segments
        try:
            logits = self._lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self._segments = None
        out = []
        for seg in segments:
            # Position t predicts token t + 1.
            seg_logits = logits[seg.start : seg.stop, :-1, :].float()
            targets = batch["labels"][seg.start : seg.stop, 1:]
            loss_sum = F.cross_entropy(seg_logits.reshape(-1, seg_logits.size(-1)), targets.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            out.append((loss_sum, int((targets != IGNORE_INDEX).sum().item())))
        return out


def train_adapters(model: MultiLoraModel, plans: Sequence[TrainingPlan], *, pad_id: int, device: torch.device,
                   progress: bool = False, desc: str = "train batched") -> list[TrainResult]:
    """Trains every adapter of `model` by its plan, all of them in one pass of the base per step.

    Per adapter this is `fedtune.training.train_adapter`: its own AdamW (with its recipe's weight
    decay and learning-rate schedule), token-mean loss, gradient clipping, and batches of `min(batch_size, n)` examples drawn from reshuffled passes
    with a generator seeded by its `seed`. An adapter with fewer steps leaves the batch when done.
    With LoRA dropout above 0 the masks come from one RNG seeded by the first plan's seed, so they
    differ from an isolated run's; with dropout 0 the weights match isolated training.

    Args:
        model: The adapters, on `device`.
        plans: One plan per adapter, in the model's order.
        pad_id: Padding token id.
        device: Where the model is.
        progress: Show a tqdm bar with the mean loss.
        desc: Label of the bar.

    Returns:
        One summary per adapter; `seconds` is the shared loop's wall time.

    Raises:
        InvalidInput: The plans do not match the adapters, or a plan has no examples or a bad setting.
    """
    totals = _plan_steps(plans, model.num_adapters)
    optimizers = [torch.optim.AdamW(model.parameters(k), lr=plan.lr, weight_decay=plan.recipe.weight_decay)
                  for k, plan in enumerate(plans)]
    orders = [_batches(len(p.examples), p.batch_size, n, torch.Generator().manual_seed(p.seed))
              for p, n in zip(plans, totals, strict=True)]
    losses: list[list[float]] = [[] for _ in plans]
    was_training = model.training
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=max(totals), desc=desc, disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(plans[0].seed)
            for step in range(max(totals)):
                active = [k for k in range(len(plans)) if step < totals[k]]
                parts = [(k, [plans[k].examples[i] for i in next(orders[k])]) for k in active]
                sums = model.token_loss_sums(parts, pad_id, device)
                # max(): a batch without labelled tokens then adds no gradient, as in train_adapter.
                step_losses = torch.stack([loss_sum / max(n, 1) for loss_sum, n in sums])
                for k in active:
                    optimizers[k].zero_grad(set_to_none=True)
                    plans[k].recipe.set_lr(optimizers[k], plans[k].lr, step, totals[k])
                # Adapters share no parameters, so the sum's gradient for each is its own loss's.
                step_losses.sum().backward()
                values = step_losses.tolist()
                for k, value in zip(active, values, strict=True):
                    max_norm = plans[k].recipe.max_grad_norm
                    if max_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(k), max_norm)
                    optimizers[k].step()
                    losses[k].append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(values) / len(values):.4f}")
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info("%s: %d adapters, %d steps in %.1fs", desc, len(plans), max(totals), seconds)
    return [
        TrainResult(num_examples=len(plan.examples), steps=len(run), mean_loss=sum(run) / len(run),
                    final_loss=run[-1], seconds=seconds)
        for plan, run in zip(plans, losses, strict=True)
    ]


def _plan_steps(plans: Sequence[TrainingPlan], n_adapters: int) -> list[int]:
    """Validates the plans and returns each one's number of steps."""
    if len(plans) != n_adapters:
        raise InvalidInput(f"{len(plans)} training plan(s) for {n_adapters} adapter(s)")
    totals = []
    for k, plan in enumerate(plans):
        if not plan.examples:
            raise InvalidInput(f"adapter {k}: no training examples")
        if plan.batch_size < 1:
            raise InvalidInput(f"adapter {k}: batch_size must be at least 1, got {plan.batch_size}")
        if plan.lr <= 0:
            raise InvalidInput(f"adapter {k}: learning rate must be positive, got {plan.lr}")
        if "position_ids" in plan.examples[0]:
            raise InvalidInput(f"adapter {k}: packed rows are not batched across adapters; train this adapter alone")
        if not plan.recipe.batchable:
            raise InvalidInput(f"adapter {k}: micro-batches, gradient checkpointing and half precision are not "
                               "batched; train this adapter alone")
        try:
            totals.append(count_steps(len(plan.examples), plan.batch_size, plan.steps, plan.epochs))
        except InvalidInput as e:
            raise InvalidInput(f"adapter {k}: {e}") from e
    return totals


def evaluate_losses(model: MultiLoraModel, datasets: Sequence[Tokenized], *, pad_id: int, batch_size: int,
                    device: torch.device) -> list[float]:
    """Each adapter's mean loss per labelled token on its own data set, in one pass over them all.

    Same definition as `fedtune.training.evaluate_loss`; each forward pass holds up to `batch_size`
    examples of every adapter that has some left.

    Args:
        model: The adapters, on `device`.
        datasets: One data set per adapter, in the model's order (the same one may repeat).
        pad_id: Padding token id.
        batch_size: Examples per adapter per forward pass.
        device: Where the model is.

    Returns:
        Per adapter, summed token cross entropy divided by its number of labelled tokens.

    Raises:
        InvalidInput: The data sets do not match the adapters, or one is empty or has no labelled tokens.
    """
    if len(datasets) != model.num_adapters:
        raise InvalidInput(f"{len(datasets)} evaluation set(s) for {model.num_adapters} adapter(s)")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    for k, data in enumerate(datasets):
        if not data:
            raise InvalidInput(f"adapter {k}: no evaluation examples")
    totals = [0.0] * len(datasets)
    counts = [0] * len(datasets)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for first in range(0, max(len(d) for d in datasets), batch_size):
                parts = [(k, d[first : first + batch_size]) for k, d in enumerate(datasets) if first < len(d)]
                for (k, _), (loss_sum, n) in zip(parts, model.token_loss_sums(parts, pad_id, device), strict=True):
                    totals[k] += loss_sum.item()
                    counts[k] += n
    finally:
        model.train(was_training)
    for k, count in enumerate(counts):
        if count == 0:
            raise InvalidInput(f"adapter {k}: evaluation examples have no labelled tokens")
    return [total / count for total, count in zip(totals, counts, strict=True)]


def train_batched(base_model: PreTrainedModel, base: str, adapters: Sequence[AdapterSpec],
                  plans: Sequence[TrainingPlan], *, pad_id: int, device: torch.device,
                  progress: bool = False) -> list[BatchedRun]:
    """Trains K adapters over one frozen base in shared passes; returns each one's summary and weights.

    Args:
        base_model: A causal LM on `device` (modified in place: peft injects its layers).
        base: Its identity; every adapter's `base` must equal it.
        adapters: What to train, see `AdapterSpec`.
        plans: How to train each, see `TrainingPlan` and `train_adapters`.
        pad_id: Padding token id.
        device: Where the model is.
        progress: Show a tqdm bar.

    Returns:
        Per adapter, its summary and trained weights, which `fedtune.peft_io.load_adapter_state`
        loads into a plain peft model with the same config.

    Raises:
        InvalidInput: See `MultiLoraModel` and `train_adapters`.
    """
    _plan_steps(plans, len(adapters))  # before the base is wrapped: bad plans leave it untouched
    model = MultiLoraModel(base_model, base, adapters)
    results = train_adapters(model, plans, pad_id=pad_id, device=device, progress=progress)
    return [BatchedRun(result, model.state(k)) for k, result in enumerate(results)]
