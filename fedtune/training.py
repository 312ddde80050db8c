"""A client's local training loop and the held-out loss, written out in full rather than hidden
behind a trainer class, so what one round of local work does can be read top to bottom.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedtune.data import IGNORE_INDEX, collate
from fedtune.errors import InvalidInput

logger = logging.getLogger(__name__)

# Clipping keeps one bad batch from blowing up a client's update before it is averaged.
_MAX_GRAD_NORM = 1.0


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
) -> TrainResult:
    """Trains the model's trainable parameters (the adapter) on tokenized examples.

    Batches are drawn from reshuffled passes over the data with a generator seeded by `seed`, so a
    run is reproducible; every batch is full, running across pass boundaries. The model's previous
    train/eval mode is restored afterwards.

    Args:
        model: A model on `device` whose trainable parameters are the ones to tune (a peft model).
        tokenized: Items from `fedtune.data.tokenize`.
        pad_id: Padding token id.
        lr: AdamW learning rate.
        batch_size: Examples per step.
        steps: Exact number of optimizer steps; takes precedence over `epochs`.
        epochs: Passes over the data when `steps` is None; rounded up to whole steps.
        seed: Seed for batch order and dropout.
        device: Where the model is.
        progress: Show a tqdm bar with the running loss.
        desc: Label of the bar.

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
    total_steps = _total_steps(len(tokenized), batch_size, steps, epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInput("model has no trainable parameters; wrap it with an adapter first")

    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    try:
        # fork_rng: LoRA dropout draws from the global RNG; seed it for this run only.
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(seed)
            for indices in _batches(len(tokenized), batch_size, total_steps, generator):
                batch = collate([tokenized[i] for i in indices], pad_id)
                loss_sum, n_tokens = _token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
                # max(): a batch without labelled tokens (not made by tokenize) then adds no gradient.
                loss = loss_sum / max(n_tokens, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
                optimizer.step()
                losses.append(loss.item())
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
        num_examples=len(tokenized),
        steps=total_steps,
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=seconds,
    )


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
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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


def _total_steps(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
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
