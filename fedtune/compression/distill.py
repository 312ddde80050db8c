"""Distilling an emulator's kept middle blocks towards the full model's middle (Offsite-Tuning).

The student is the emulator: the full model's adapter blocks around a few kept middle blocks; the
teacher is the full model. Only the kept middle blocks train. The loss, as in the Offsite-Tuning
reference code, is the emulator's LM loss plus the normalised MSE between the hidden state after
the teacher's middle blocks (t) and after the student's (s): mean((t - s)^2) / mean(t^2), over
the tokens that are not padding.

Teacher and student share every module but the middle, so one model object serves as both: the
caller passes `use_full` and `use_emulator`, which put the matching blocks in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from fedtune.compression.emulator_manifest import DistillResult
from fedtune.data import IGNORE_INDEX

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@contextmanager
def _tap(block: nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """Records the hidden state a decoder block outputs (blocks return a tensor or a tuple)."""
    def hook(_module: nn.Module, _args: object, output: object) -> None:
        into.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _nmse_sums(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = mask.bool()
    t, s = teacher.float()[keep], student.float()[keep]
    return (t - s).pow(2).sum(), t.pow(2).sum()


def _teacher_state(model: nn.Module, tap: nn.Module, batch: Batch) -> torch.Tensor:
    out: list[torch.Tensor] = []
    with torch.no_grad(), _tap(tap, out):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out[-1].detach()


def _student_pass(model: nn.Module, tap: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out: list[torch.Tensor] = []
    with _tap(tap, out):
        lm_loss = model(**batch, use_cache=False).loss
    return lm_loss, out[-1]


def _measure(model: nn.Module, *, use_full: Callable[[], None], use_emulator: Callable[[], None],
             teacher_tap: nn.Module, student_tap: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    err = ref = lm_sum = 0.0
    tokens = 0
    for batch in batches:
        use_full()
        model.eval()
        t = _teacher_state(model, teacher_tap, batch)
        use_emulator()
        model.eval()
        with torch.no_grad():
            lm_loss, s = _student_pass(model, student_tap, batch)
        e, r = _nmse_sums(t, s, batch["attention_mask"])
        err, ref = err + float(e), ref + float(r)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        lm_sum, tokens = lm_sum + float(lm_loss) * n, tokens + n
    return err / ref, lm_sum / max(tokens, 1)


def distill_middle(
    model: nn.Module,
    *,
    use_full: Callable[[], None],
    use_emulator: Callable[[], None],
    teacher_tap: nn.Module,
    student_tap: nn.Module,
    trainable: Sequence[nn.Module],
    batches: Sequence[Batch],
    steps: int,
    lr: float,
    generator: torch.Generator,
) -> DistillResult:
    """Trains the emulator's kept middle blocks to reproduce the full model's middle.

    Args:
        model: The model; `use_full` / `use_emulator` switch its blocks.
        use_full: Installs the full model's blocks.
        use_emulator: Installs the emulator's blocks.
        teacher_tap: The full model's last middle block (its output is the target).
        student_tap: The emulator's last kept middle block.
        trainable: The blocks that train (the emulator's kept middle, copies of the full model's).
        batches: Collated batches (`fedtune.data.collate`), cycled in a random order.
        steps: AdamW steps.
        lr: Learning rate.
        generator: Randomness of the batch order.

    Returns:
        Losses before and after, measured on all of `batches` in eval mode.
    """
    model.requires_grad_(False)
    params = [p for block in trainable for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    def measure() -> tuple[float, float]:
        return _measure(model, use_full=use_full, use_emulator=use_emulator, teacher_tap=teacher_tap,
                        student_tap=student_tap, batches=batches)

    nmse_before, lm_before = measure()
    optimizer = torch.optim.AdamW(params, lr=lr)
    order: list[int] = []
    for _ in tqdm(range(steps), desc="distilling emulator", unit="step", leave=False):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        batch = batches[order.pop()]
        use_full()
        model.eval()
        t = _teacher_state(model, teacher_tap, batch)
        use_emulator()
        model.train()
        lm_loss, s = _student_pass(model, student_tap, batch)
        err, ref = _nmse_sums(t, s, batch["attention_mask"])
        loss = lm_loss + err / ref
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    nmse_after, lm_after = measure()
    model.requires_grad_(False)
    logger.info("distilled %d steps: nmse %.4f -> %.4f, lm loss %.4f -> %.4f",
                steps, nmse_before, nmse_after, lm_before, lm_after)
    return DistillResult(steps=steps, lr=lr, examples=sum(len(b["input_ids"]) for b in batches),
                         nmse_before=nmse_before, nmse_after=nmse_after,
                         lm_loss_before=lm_before, lm_loss_after=lm_after)
