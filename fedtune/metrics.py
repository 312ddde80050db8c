"""Evaluation metrics beyond the loss, asked for by name in a job spec's ``evaluation.metrics``.

- ``token_accuracy``: the share of labelled tokens (the ones the loss covers, after the job's
  rendering) that the model's greedy next-token prediction gets right, over the whole data set.
- ``exact_match``: the model's greedy response to each prompt (a pair's prompt; a conversation up
  to its last assistant turn, rendered as the job renders it), compared with the reference after
  `normalize_answer`. Plain text (a record with no prompt) has nothing to compare and is skipped.
- ``choice_accuracy``: for multiple-choice questions (`fedtune.data.Choice`), the option of highest
  summed log-likelihood given the prompt, as lm-eval-harness' ``acc``; also ``acc_norm``, the
  log-likelihood divided by the option's length in characters.

``loss`` and ``perplexity`` are `fedtune.training.evaluate_loss`'s. Every metric here runs the
model under ``no_grad`` in eval mode and restores its mode afterwards.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fedtune.data import IGNORE_INDEX, Chat, Choice, DataFile, Example, collate, tokenize
from fedtune.data.render import chat_template_for, encode, segments_of
from fedtune.data.schemas import LoadedData, as_data_spec, parse_records
from fedtune.errors import InvalidInput
from fedtune.methods import PeftMethod, method_of_config

if TYPE_CHECKING:
    from fedtune.spec import DataSpec

logger = logging.getLogger(__name__)

# The metrics computed here; the spec's other names (loss, perplexity) are the loss's.
METRICS = ("token_accuracy", "exact_match", "choice_accuracy")
_LOSS_METRICS = ("loss", "perplexity")
_PUNCTUATION = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """A response as exact match compares it: lower case, whitespace runs made one space, and
    punctuation and whitespace stripped from both ends (inner punctuation stays: "3.14")."""
    return re.sub(r"\s+", " ", text.lower()).strip(_PUNCTUATION)


def check_metric_data(names: Sequence[str], records: Sequence[Example | Chat], where: str) -> None:
    """Refuses metrics that the records cannot be scored by.

    Args:
        names: Metric names (a spec's ``evaluation.metrics``).
        records: What `fedtune.data.load_data` read.
        where: The file, for the message.

    Raises:
        InvalidInput: ``choice_accuracy`` without a multiple-choice record, or ``exact_match``
            without a record that has a prompt and a response.
    """
    if "choice_accuracy" in names and not _scorable("choice_accuracy", records):
        raise InvalidInput(f"evaluation.metrics choice_accuracy: {where} has no multiple-choice record "
                           "({prompt, choices, answer}) to score")
    if "exact_match" in names and not _scorable("exact_match", records):
        raise InvalidInput(f"evaluation.metrics exact_match: {where} has no record with a prompt and a "
                           "response to compare (plain text only)")


def _scorable(name: str, records: Sequence[Example | Chat]) -> bool:
    if name == "choice_accuracy":
        return any(isinstance(r, Choice) for r in records)
    if name == "exact_match":
        return any(_has_reference(r) for r in records)
    return True


def evaluate_metrics(
    model: Any,
    tokenizer: Any,
    records: Sequence[Example | Chat] | DataFile,
    names: Sequence[str],
    *,
    data: DataSpec | Mapping[str, Any] | None,
    max_seq_len: int,
    batch_size: int,
    device: torch.device,
    max_new_tokens: int = 32,
    strict: bool = True,
) -> dict[str, float]:
    """Computes the named metrics of a model on a data set (``loss`` and ``perplexity`` are skipped).

    Args:
        model: A causal LM on `device`, or a peft model around one.
        tokenizer: The base model's tokenizer.
        records: From `fedtune.data.load_data`, or a `DataFile` from `read_data` (read under `data`).
        names: Metric names, as a job spec's ``evaluation.metrics``.
        data: The job's data settings (a `DataSpec` or its dict); None: defaults.
        max_seq_len: The job's ``training.max_seq_len``: sequences are cut to it as in training,
            and a prompt that leaves no room for a response is not generated from.
        batch_size: Sequences per forward pass (the results do not depend on it).
        device: Where the model is.
        max_new_tokens: exact_match's longest generated response, in tokens.
        strict: Refuse a metric the records cannot score; False: leave it out (a client's
            held-out data may hold no question of the kind the job's eval data has).

    Returns:
        ``eval_token_accuracy`` and ``eval_tokens`` (labelled tokens counted); ``eval_exact_match``
        and ``eval_exact_match_examples``; ``eval_choice_accuracy``, ``eval_choice_accuracy_norm``
        and ``eval_choice_examples``: those of the metrics asked for.

    Raises:
        InvalidInput: An unknown metric name, records that the metric cannot score (see
            `check_metric_data`), or exact_match on a method that cannot generate.
    """
    unknown = [n for n in names if n not in METRICS + _LOSS_METRICS]
    if unknown:
        raise InvalidInput(f"unknown metric {unknown[0]!r}; known: {', '.join(_LOSS_METRICS + METRICS)}")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    spec = as_data_spec(data)
    if isinstance(records, DataFile):
        records = parse_records(records, spec)
    elif isinstance(records, LoadedData) and records.columns != spec.columns():
        records = parse_records(records.source, spec)
    where = str(records.source.path) if isinstance(records, LoadedData) else "the evaluation data"
    if not strict:
        names = [name for name in names if _scorable(name, records)]
    check_metric_data(names, records, where)
    method = _method(model)
    if "exact_match" in names and method is not None and not method.generates:
        raise InvalidInput(f"evaluation.metrics exact_match: peft cannot generate with peft.method {method.name}")
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if "token_accuracy" in names:
                correct, count = _token_hits(model, tokenize(records, tokenizer, max_seq_len, spec),
                                             tokenizer.pad_token_id, batch_size, device)
                out |= {"eval_token_accuracy": correct / count, "eval_tokens": float(count)}
            if "exact_match" in names:
                out |= _exact_match(model, tokenizer, records, spec, max_seq_len, batch_size, device,
                                    max_new_tokens, where)
            if "choice_accuracy" in names:
                questions = [r for r in records if isinstance(r, Choice)]
                scores = _choice_scores(model, tokenizer, questions, spec, max_seq_len, batch_size, device)
                out |= _choice_metrics(questions, scores)
    finally:
        model.train(was_training)
    return out


def score_choices(model: Any, tokenizer: Any, questions: Sequence[Choice], *,
                  data: DataSpec | Mapping[str, Any] | None, max_seq_len: int, batch_size: int,
                  device: torch.device) -> list[list[float]]:
    """The summed log-likelihood of each option of each question given its prompt (what
    ``choice_accuracy`` ranks).

    The prompt is rendered as training renders it (``bos + prompt`` for a pair; the chat template's
    prefix under ``data.pairs_as_chat``) and the option's tokens follow it; only those are scored,
    not the eos that training appends. A sequence longer than `max_seq_len` loses its first tokens.

    Returns:
        One list per question, one log-likelihood per option, in order.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _choice_scores(model, tokenizer, questions, as_data_spec(data), max_seq_len, batch_size, device)
    finally:
        model.train(was_training)


def _method(model: Any) -> type[PeftMethod] | None:
    """The registered method of a peft model's active adapter (None for a plain model)."""
    config = getattr(model, "active_peft_config", None)
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else method_of_config({"peft_type": str(getattr(peft_type, "value", peft_type))})


def _has_reference(record: Example | Chat) -> bool:
    return isinstance(record, Chat) or bool(record.prompt)


def _logits(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp32 logits of the real tokens' positions (prompt tuning's virtual tokens sliced off)."""
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, logits.size(1) - input_ids.size(1):, :].float()


def _token_hits(model: Any, tokenized: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int,
                device: torch.device) -> tuple[int, int]:
    """Labelled tokens predicted right by the argmax at the position before, and labelled tokens."""
    correct = count = 0
    for first in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[first:first + batch_size], pad_id)
        predicted = _logits(model, batch, device)[:, :-1, :].argmax(-1).cpu()
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        correct += int((predicted[mask] == targets[mask]).sum())
        count += int(mask.sum())
    if count == 0:
        raise InvalidInput("evaluation examples have no labelled tokens")
    return correct, count


@dataclass(frozen=True)
class _Rendered:
    """A record as a metric reads it: its prompt's ids, the reference response, and the text the
    template ends an assistant turn with ("" for pairs, which end with eos)."""

    prompt_ids: list[int]
    reference: str
    end: str


def _renderer(tokenizer: Any, records: Sequence[Example | Chat],
              spec: DataSpec) -> Callable[[Example | Chat], _Rendered]:
    needs_chat = any(isinstance(r, Chat) or (spec.pairs_as_chat and r.prompt) for r in records)
    template = chat_template_for(tokenizer, spec.chat_template)[0] if needs_chat else ""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def render(record: Example | Chat) -> _Rendered:
        """The prompt as `tokenize` renders it, segment by segment, up to the last trained segment."""
        if isinstance(record, Example) and not (spec.pairs_as_chat and record.prompt):
            return _Rendered(bos + encode(tokenizer, record.prompt), record.response, "")
        segments = segments_of(record, tokenizer, spec, template)
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        prompt_ids = [t for text, _ in segments[:last] for t in encode(tokenizer, text)]
        reference = record.response if isinstance(record, Example) else record.messages[-1][1]
        # The assistant turn as rendered: its content, then the template's end-of-turn text.
        turn, content = segments[last][0], reference.strip()
        at = turn.find(content) if content else -1
        return _Rendered(prompt_ids, reference, turn[at + len(content):].strip() if at >= 0 else "")

    return render


def _exact_match(model: Any, tokenizer: Any, records: Sequence[Example | Chat], spec: DataSpec, max_seq_len: int,
                 batch_size: int, device: torch.device, max_new_tokens: int, where: str) -> dict[str, float]:
    render = _renderer(tokenizer, records, spec)
    items = [render(r) for r in records if _has_reference(r)]
    kept = [item for item in items if len(item.prompt_ids) < max_seq_len]
    if not kept:
        raise InvalidInput(f"evaluation.metrics exact_match: every prompt of {where} is at least "
                           f"training.max_seq_len ({max_seq_len}) tokens long, leaving no room for a response")
    if len(kept) < len(items):
        logger.warning("exact_match: left out %d of %d examples whose prompt fills max_seq_len=%d",
                       len(items) - len(kept), len(items), max_seq_len)
    hits = 0
    # Prompts of one length share a generate call: no padding, so every row is exactly its own.
    by_length: dict[int, list[_Rendered]] = {}
    for item in kept:
        by_length.setdefault(len(item.prompt_ids), []).append(item)
    for length, group in by_length.items():
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            responses = _generate(model, tokenizer, [item.prompt_ids for item in chunk], length, device,
                                  max_new_tokens, {item.end for item in chunk if item.end})
            for item, response in zip(chunk, responses, strict=True):
                if item.end:
                    response = response.split(item.end, 1)[0]
                hits += normalize_answer(response) == normalize_answer(item.reference)
    return {"eval_exact_match": hits / len(kept), "eval_exact_match_examples": float(len(kept))}


def _generate(model: Any, tokenizer: Any, prompts: list[list[int]], length: int, device: torch.device,
              max_new_tokens: int, ends: set[str]) -> list[str]:
    """Greedy responses to equally long prompts, each cut at its first eos (or one-token end of turn).

    A response may take `max_new_tokens`, and the template's end-of-turn text its own tokens beyond.
    """
    from transformers import GenerationConfig

    stop = {tokenizer.eos_token_id} - {None}
    room = 0
    for end in ends:
        ids = encode(tokenizer, end)
        if len(ids) == 1:
            stop.add(ids[0])
        room = max(room, len(ids))
    max_new_tokens += room
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int):
        max_new_tokens = max(1, min(max_new_tokens, limit - length))
    # A config of its own: the model's may sample, or stop elsewhere.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(stop) or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                              tokenizer.eos_token_id)
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    responses = []
    for row in out[:, length:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        responses.append(tokenizer.decode(row[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return responses


def _choice_scores(model: Any, tokenizer: Any, questions: Sequence[Choice], spec: DataSpec, max_seq_len: int,
                   batch_size: int, device: torch.device) -> list[list[float]]:
    render = _renderer(tokenizer, questions, spec)
    rows: list[dict[str, list[int]]] = []
    for question in questions:
        context = render(question).prompt_ids
        for option in question.choices:
            continuation = encode(tokenizer, option)
            ids = (context + continuation)[-max_seq_len:]
            scored = min(len(continuation), len(ids) - 1)
            rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - scored) + ids[len(ids) - scored:]})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat: list[float] = []
    for first in range(0, len(rows), batch_size):
        batch = collate(rows[first:first + batch_size], pad_id)
        logits = _logits(model, batch, device)[:, :-1, :]
        targets = batch["labels"][:, 1:].to(logits.device)
        token = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        flat += token.sum(dim=1).tolist()
    out: list[list[float]] = []
    start = 0
    for question in questions:
        out.append(flat[start:start + len(question.choices)])
        start += len(question.choices)
    return out


def _choice_metrics(questions: Sequence[Choice], scores: list[list[float]]) -> dict[str, float]:
    right = right_norm = 0
    for question, options in zip(questions, scores, strict=True):
        # The first of equal scores wins, as argmax picks it.
        right += _argmax(options) == question.answer
        right_norm += _argmax([s / len(c) for s, c in zip(options, question.choices, strict=True)]) == question.answer
    n = len(questions)
    return {"eval_choice_accuracy": right / n, "eval_choice_accuracy_norm": right_norm / n,
            "eval_choice_examples": float(n)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))
