"""A client's local training loop and the held-out loss, written out in full rather than hidden
behind a trainer class, so what one round of local work does can be read top to bottom.

The loop follows the job's training recipe (:class:`Recipe`): gradient accumulation over
micro-batches, a learning-rate schedule over the job's global steps, AdamW with weight decay,
gradient clipping, gradient checkpointing and mixed precision (autocast, with a GradScaler for
fp16).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedtune.data import IGNORE_INDEX, collate
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from fedtune.strategies.local import LocalObjective

logger = logging.getLogger(__name__)

# Clipping keeps one bad batch from blowing up a client's update before it is averaged.
_MAX_GRAD_NORM = 1.0
# torch's AdamW default, which the loop used before weight decay was a setting.
DEFAULT_WEIGHT_DECAY = 0.01
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Recipe:
    """How each optimizer step is taken, beyond the learning rate and the batch size.

    Attributes:
        micro_batch: Examples per forward/backward pass; the step's batch is split into passes of
            this size and their gradients accumulated (None: the whole batch in one pass).
        lr_scheduler: constant, linear or cosine decay over ``total_steps``.
        warmup_steps: Steps of linear warmup at the start of the schedule.
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: Gradients are clipped to this L2 norm per step (None: not clipped).
        gradient_checkpointing: Recompute activations in the backward pass (memory for time).
        precision: fp32, bf16 or fp16 (resolved with :func:`resolve_precision`; not auto).
        first_step: Global step of this run's first optimizer step (the schedule's position).
        total_steps: Length of the schedule in global steps (None: this run's own steps).
    """

    micro_batch: int | None = None
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    max_grad_norm: float | None = _MAX_GRAD_NORM
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    first_step: int = 0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.lr_scheduler not in SCHEDULERS:
            raise InvalidInput(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.precision not in _DTYPES:
            raise InvalidInput(f"precision must be fp32, bf16 or fp16 here, got {self.precision!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InvalidInput(f"micro-batch must be at least 1, got {self.micro_batch}")

    @property
    def dtype(self) -> torch.dtype:
        """The autocast type (and the frozen base's), fp32 meaning none."""
        return precision_dtype(self.precision)

    @property
    def batchable(self) -> bool:
        """Whether adapters under this recipe can share one pass (`fedtune.batching`): no micro-batches,
        checkpointing or autocast there."""
        return self.micro_batch is None and not self.gradient_checkpointing and self.precision == "fp32"

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
        """Sets the learning rate of this run's local ``step`` (of ``steps``) on the optimizer."""
        horizon = self.total_steps or self.first_step + steps
        for group in optimizer.param_groups:
            group["lr"] = lr * self.lr_factor(self.first_step + step, horizon)

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of the base learning rate at global step ``step`` of ``total``.

        Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. After it, with
        ``p = (step - warmup) / (total - warmup)``: constant 1, linear ``1 - p``, cosine
        ``(1 + cos(pi * p)) / 2``. Steps past ``total`` (a job extended) keep the last value's rule
        with ``p`` capped at 1.
        """
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if self.lr_scheduler == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total - warm))
        if self.lr_scheduler == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))


def recipe_from_training(training: Mapping[str, Any], *, round_no: int, steps: int, device: torch.device,
                         micro_batch: int | None = None) -> Recipe:
    """The recipe of one round of a job, from the training settings its task carries.

    Args:
        training: The task's training settings (the spec's ``training`` plus ``rounds``).
        round_no: The round (from 1): its first step is ``(round_no - 1) * steps``.
        steps: This client's optimizer steps per round.
        device: Where the client trains (resolves precision auto and refuses what it cannot do).
        micro_batch: The client's own micro-batch (``--micro-batch``); else the job's split.

    Raises:
        InvalidInput: The micro-batch does not divide the batch, or the device cannot run the
            precision.
    """
    batch = int(training.get("batch_size", 8))
    accumulation = int(training.get("gradient_accumulation_steps", 1))
    if micro_batch is None:
        micro_batch = batch // accumulation
    check_micro_batch(micro_batch, batch)
    total = int(training.get("rounds", 1)) * steps
    ratio = training.get("warmup_ratio")
    warmup = training.get("warmup_steps")
    warmup_steps = int(warmup) if warmup is not None else math.ceil(float(ratio) * total) if ratio else 0
    norm = training.get("max_grad_norm", _MAX_GRAD_NORM)
    return Recipe(
        micro_batch=None if micro_batch >= batch else micro_batch,
        lr_scheduler=str(training.get("lr_scheduler", "constant")),
        warmup_steps=warmup_steps,
        weight_decay=float(training.get("weight_decay", DEFAULT_WEIGHT_DECAY)),
        max_grad_norm=None if norm is None else float(norm),
        gradient_checkpointing=bool(training.get("gradient_checkpointing", False)),
        precision=resolve_precision(str(training.get("precision", "auto")), device),
        first_step=(round_no - 1) * steps,
        total_steps=total,
    )


def check_micro_batch(micro_batch: int | None, batch: int) -> None:
    """Refuses a client's micro-batch that does not divide the job's batch.

    Raises:
        InvalidInput: naming both and what to use.
    """
    if micro_batch is not None and batch % micro_batch:
        raise InvalidInput(f"--micro-batch {micro_batch} does not divide the job's batch_size {batch}; "
                           f"use a divisor of {batch}")


def precision_dtype(precision: str) -> torch.dtype:
    """The torch type of a resolved precision (fp32, bf16 or fp16)."""
    return _DTYPES[precision]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a device trains in: ``auto`` resolved, and what it cannot do refused.

    auto is bf16 on a CUDA GPU with bf16, fp16 on an older one, and fp32 on CPU (half precision
    there is slower than fp32 for the small models a CPU trains).

    Raises:
        InvalidInput: fp16 on CPU, or bf16 on a GPU without it (the reason named).
    """
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return ("bf16" if bf16 else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise InvalidInput(f"precision fp16 needs a CUDA GPU (its loss scaling is for GPU kernels); this client "
                           f"trains on {device.type}: use bf16 or fp32")
    if precision == "bf16" and cuda and not bf16:
        name = torch.cuda.get_device_name(device)
        raise InvalidInput(f"precision bf16: GPU {name} has no bf16 support (it needs compute capability 8.0 or "
                           "later); use fp16 or fp32")
    return precision


@dataclass(frozen=True)
class TrainResult:
    """What a local training run did.

    Attributes:
        num_examples: Tokenized examples available to the run (the weight in federated averaging).
        steps: Optimizer steps taken.
        mean_loss: Mean of the per-step training losses.
        final_loss: Training loss of the last step.
        seconds: Wall time of the loop.
    """

    num_examples: int
    steps: int
    mean_loss: float
    final_loss: float
    seconds: float


def train_adapter(
    model: torch.nn.Module,
    tokenized: Sequence[dict[str, list[int]]],
    *,
    pad_id: int,
    lr: float,
    batch_size: int,
    steps: int | None,
    epochs: float | None,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    recipe: Recipe | None = None,
    objective: LocalObjective | None = None,
) -> TrainResult:
    """Trains the model's trainable parameters (the adapter) on tokenized examples.

    Batches are drawn from reshuffled passes over the data with a generator seeded by `seed`, so a
    run is reproducible; every batch is full, running across pass boundaries. A batch is split into
    micro-batches whose gradients add up to the whole batch's: the loss is the mean over every
    labelled token of the batch, whatever its split, so a client's micro-batch changes memory and
    time but not the step. The model's previous train/eval mode is restored afterwards.

    Args:
        model: A model on `device` whose trainable parameters are the ones to tune (a peft model).
        tokenized: Items from `fedtune.data.tokenize`.
        pad_id: Padding token id.
        lr: AdamW learning rate (the schedule's peak).
        batch_size: Examples per optimizer step.
        steps: Exact number of optimizer steps; takes precedence over `epochs`.
        epochs: Passes over the data when `steps` is None; rounded up to whole steps.
        seed: Seed for batch order and dropout.
        device: Where the model is.
        progress: Show a tqdm bar with the running loss.
        desc: Label of the bar.
        recipe: Accumulation, schedule, weight decay, clipping, checkpointing and precision
            (default: one pass per batch, constant lr, clipping at 1.0, fp32).
        objective: A client-side strategy's hooks (FedProx's proximal gradient, SCAFFOLD's
            correction), already given the parameters with :meth:`LocalObjective.begin`.

    Returns:
        The run's summary.

    Raises:
        InvalidInput: No examples, no trainable parameters, or a non-positive setting.
    """
    if not tokenized:
        raise InvalidInput("no training examples")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    if lr <= 0:
        raise InvalidInput(f"learning rate must be positive, got {lr}")
    recipe = recipe or Recipe()
    total_steps = count_steps(len(tokenized), batch_size, steps, epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInput("model has no trainable parameters; wrap it with an adapter first")

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    try:
        # fork_rng: LoRA dropout draws from the global RNG; seed it for this run only.
        with torch.random.fork_rng(devices=_cuda_devices(device)), _checkpointing(model, recipe.gradient_checkpointing):
            torch.manual_seed(seed)
            for step, indices in enumerate(_batches(len(tokenized), batch_size, total_steps, generator)):
                recipe.set_lr(optimizer, lr, step, total_steps)
                optimizer.zero_grad(set_to_none=True)
                loss = _accumulate(model, [tokenized[i] for i in indices], pad_id, device, recipe, scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                if objective is not None:
                    objective.before_clip()
                if recipe.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if objective is not None:
                    objective.after_step(float(optimizer.param_groups[0]["lr"]))
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info(
        "%s: %d steps on %d examples, loss %.4f -> %.4f in %.1fs",
        desc,
        total_steps,
        len(tokenized),
        losses[0],
        losses[-1],
        seconds,
    )
    return TrainResult(
        # Packed rows hold several examples: the federated weight is the examples' count.
        num_examples=int(getattr(tokenized, "examples", 0) or len(tokenized)),
        steps=total_steps,
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=seconds,
    )


def _accumulate(model: torch.nn.Module, items: list[dict[str, list[int]]], pad_id: int, device: torch.device,
                recipe: Recipe, scaler: torch.amp.GradScaler | None) -> float:
    """Runs one step's forward and backward passes, micro-batch by micro-batch; returns its loss.

    Each pass's summed loss is divided by the labelled tokens of the whole batch (counted before
    any forward), so the accumulated gradient is the whole batch's token-mean gradient.
    """
    size = recipe.micro_batch or len(items)
    micros = [collate(items[i:i + size], pad_id) for i in range(0, len(items), size)]
    # Position t predicts token t + 1: the first label of each row is never a target.
    n_tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micros)
    total = 0.0
    for micro in micros:
        with _autocast(device, recipe.dtype):
            loss_sum, _ = _token_loss_sum(model, {k: v.to(device) for k, v in micro.items()})
        # max(): a batch without labelled tokens (not made by tokenize) then adds no gradient.
        loss = loss_sum / max(n_tokens, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
    return total


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing on the model's blocks for the duration of a run (then off again)."""
    if not enabled:
        yield
        return
    # transformers 5 names it activation checkpointing; the old name is kept for other stacks.
    new_api = getattr(model, "activation_checkpointing_enable", None) is not None
    enable = getattr(model, "activation_checkpointing_enable" if new_api else "gradient_checkpointing_enable", None)
    if enable is None:
        raise InvalidInput(f"{type(model).__name__} does not support gradient checkpointing")
    # Non-reentrant checkpointing needs no input that requires grad (the base is frozen, only the
    # adapter trains), and it replays the dropout RNG, so gradients equal those without it.
    enable(**{"activation_checkpointing_kwargs" if new_api else "gradient_checkpointing_kwargs":
              {"use_reentrant": False}})
    try:
        yield
    finally:
        getattr(model, "activation_checkpointing_disable" if new_api else "gradient_checkpointing_disable")()


def evaluate_loss(
    model: torch.nn.Module,
    tokenized: Sequence[dict[str, list[int]]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> float:
    """Computes the mean loss per labelled token over a data set.

    Every labelled token weighs the same, whatever batch it falls in, so the result does not
    depend on `batch_size`. The model's previous train/eval mode is restored afterwards.

    Args:
        model: A causal LM on `device`.
        tokenized: Items from `fedtune.data.tokenize`.
        pad_id: Padding token id.
        batch_size: Examples per forward pass.
        device: Where the model is.

    Returns:
        Summed token cross entropy divided by the number of labelled tokens.

    Raises:
        InvalidInput: No examples or no labelled tokens.
    """
    if not tokenized:
        raise InvalidInput("no evaluation examples")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        with torch.no_grad():
            for first in range(0, len(tokenized), batch_size):
                batch = collate(tokenized[first : first + batch_size], pad_id)
                loss_sum, n_tokens = _token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
                total += loss_sum.item()
                count += n_tokens
    finally:
        model.train(was_training)
    if count == 0:
        raise InvalidInput("evaluation examples have no labelled tokens")
    return total / count


def _token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled positions, and how many there are.

    Computed here rather than by the model so training and evaluation weigh tokens the same way
    on any architecture, and in fp32 whatever dtype the model runs in.
    """
    # Packed rows carry position_ids and no attention mask: the model then keeps attention within
    # each packed example (transformers finds the examples where the positions restart).
    inputs: dict[str, Any] = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if "position_ids" in batch:
        # With a cache (transformers makes one in training too when config.use_cache is on), the
        # packed examples are not found and attention crosses them.
        inputs["use_cache"] = False
    logits = model(input_ids=batch["input_ids"], **inputs).logits
    # Prompt tuning prepends its virtual tokens to the logits; the labels are the real tokens'.
    logits = logits[:, logits.size(1) - batch["input_ids"].size(1):, :]
    # Position t predicts token t + 1.
    logits = logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    n_tokens = int((targets != IGNORE_INDEX).sum().item())
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, n_tokens


def count_steps(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        if steps < 1:
            raise InvalidInput(f"steps must be at least 1, got {steps}")
        return steps
    if epochs is None:
        raise InvalidInput("give either steps or epochs for local training")
    if epochs <= 0:
        raise InvalidInput(f"epochs must be positive, got {epochs}")
    return math.ceil(epochs * n_examples / batch_size)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Yields `steps` index lists of `min(batch_size, n)` examples from back-to-back shuffled passes."""
    size = min(batch_size, n)
    pending: list[int] = []
    for _ in range(steps):
        while len(pending) < size:
            pending.extend(torch.randperm(n, generator=generator).tolist())
        yield pending[:size]
        pending = pending[size:]


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
