"""Batches of tokenized examples: right padding, or packing several examples into one row.

A packed row carries `position_ids` that restart at 0 for each example and no attention mask:
transformers (5.x) then finds the examples from the positions (`masking_utils.
find_packed_sequence_indices`) and keeps attention within each one, for sdpa, eager and flex
attention alike; flash-attention reads the same positions. It does so only without a KV cache:
call the model with `use_cache=False`, or transformers (which makes a cache whenever
`config.use_cache` is on, in training mode too) skips the detection and attention crosses
examples. Padding at the end of a row is a segment of its own (positions from 0 again, labels
`IGNORE_INDEX`). The first label of each packed example is `IGNORE_INDEX`, so no example is
predicted from the last token of the one before.

Architectures whose attention mask ignores packed positions (`PACKING_REFUSED`) are refused;
`check_packing` tells it of any loaded model by running it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedtune.data.examples import IGNORE_INDEX
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    import torch

# Found by `check_packing` on tiny models of each family (transformers 5.24; OPT in
# tests/test_data_formats.py): these build their causal mask without the position ids, so attention
# would cross from one packed example into the next. Llama, Qwen2/3, Mistral, Gemma 1-3, GPT-2,
# GPT-NeoX, Falcon and Phi keep packed examples apart.
PACKING_REFUSED = {"opt": "OPT", "bloom": "BLOOM", "mpt": "MPT"}


def refuse_packing(model_type: str | None) -> None:
    """Refuses packing for an architecture that would let packed examples attend to each other.

    Raises:
        InvalidInput: `model_type` (a config's `model_type`) is in `PACKING_REFUSED`.
    """
    if model_type in PACKING_REFUSED:
        raise InvalidInput(f"training.packing: {PACKING_REFUSED[model_type]} models build their attention mask "
                           "without the position ids, so packed examples would attend to each other; turn "
                           "packing off for this base")


def pack(items: Sequence[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Packs tokenized examples, in order, into rows of at most `max_seq_len` tokens.

    Greedy: each example goes into the current row while it fits, else starts the next row.

    Args:
        items: From `tokenize` (each at most `max_seq_len` tokens).
        max_seq_len: Longest row.

    Returns:
        One `{"input_ids", "labels", "position_ids"}` per row.
    """
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for item in items:
        n = len(item["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > max_seq_len:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += item["input_ids"]
        # The model predicts labels[t] from token t-1: at an example's start that is the token
        # before it, from another example.
        row["labels"] += [IGNORE_INDEX, *item["labels"][1:]]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads tokenized examples (or packed rows) into a batch.

    Args:
        batch: Items from `tokenize`, all packed or none.
        pad_id: Token id written into padded positions (masked out of attention and loss).

    Returns:
        `input_ids`, `attention_mask` and `labels`, each of shape (batch, longest sequence); for
        packed rows `input_ids`, `labels` and `position_ids`, and no `attention_mask`.

    Raises:
        InvalidInput: The batch mixes packed rows and single examples.
    """
    import torch

    packed = {"position_ids" in item for item in batch}
    if len(packed) > 1:
        raise InvalidInput("a batch mixes packed rows and single examples")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    if packed == {True}:
        # Padding restarts at position 0: a segment of its own, seen by no example.
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(batch), 1)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
            position_ids[row, :n] = torch.tensor(item["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n, dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_packing(model: Any, atol: float = 1e-4) -> None:
    """Checks by running it that a model keeps packed examples apart (attention and positions).

    Two short random sequences are run packed in one row and each alone (as training runs them:
    `use_cache=False`, no attention mask); their logits must agree. Run it in eval mode (dropout).

    Args:
        model: A causal LM (or a peft model around one), on any device.
        atol: Largest difference allowed between the logits.

    Raises:
        InvalidInput: The logits differ: the model lets packed examples see each other.
    """
    import torch

    config = getattr(model, "config", None)
    refuse_packing(getattr(config, "model_type", None))
    device = next(model.parameters()).device
    vocab = int(getattr(config, "vocab_size", 0) or 32)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (5, 4))
    positions = torch.tensor([[*range(5), *range(4)]], device=device)
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits.float()
        alone = torch.cat([model(input_ids=x, use_cache=False).logits.float() for x in (a, b)], dim=1)
    difference = (packed - alone).abs().max().item()
    if difference > atol:
        name = type(getattr(model, "base_model", model)).__name__
        raise InvalidInput(f"training.packing: {name} does not keep packed examples apart (logits differ by "
                           f"{difference:.2g}); turn packing off for this base")
