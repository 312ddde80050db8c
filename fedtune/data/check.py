"""`fedtune data check`: what a client will train on, read and rendered the way the client does."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.data.examples import IGNORE_INDEX
from fedtune.data.render import TokenizedData, tokenize
from fedtune.data.schemas import LoadedData, as_data_spec, load_data

if TYPE_CHECKING:
    from fedtune.spec import DataSpec


@dataclass(frozen=True)
class DataReport:
    """What `check_data` found.

    Attributes:
        path: The file.
        format: Its format (see `fedtune.data.FORMATS`).
        note: How it was read, when worth saying (the split of a DatasetDict).
        records: Records read.
        schemas: Records of each schema.
        template: The chat template that rendered conversations ("" when none did).
        max_seq_len: The cut.
        too_long: "truncate" or "drop".
        percentiles: Token lengths after the template, before the cut: p50, p90, p99, max.
        truncated: Examples cut to max_seq_len.
        dropped: Examples left out (too long under drop, or nothing to train on once cut).
        kept: Examples trained on.
        packed_rows: Rows they pack into, when the job packs (else None).
        example: The first kept example as decoded `(text, trained)` segments, after the cut.
    """

    path: Path
    format: str
    note: str
    records: int
    schemas: dict[str, int]
    template: str
    max_seq_len: int
    too_long: str
    percentiles: dict[str, int]
    truncated: int
    dropped: int
    kept: int
    packed_rows: int | None
    example: list[tuple[str, bool]]

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {"path": str(self.path), "format": self.format, "note": self.note, "records": self.records,
                "schemas": self.schemas, "chat_template": self.template, "max_seq_len": self.max_seq_len,
                "too_long": self.too_long, "tokens": self.percentiles, "truncated": self.truncated,
                "dropped": self.dropped, "kept": self.kept, "packed_rows": self.packed_rows,
                "example": [{"text": text, "trained": trained} for text, trained in self.example]}


def check_data(path: Path | LoadedData, tokenizer: Any, max_seq_len: int,
               data: DataSpec | Mapping[str, Any] | None = None, format: str | None = None,
               packing: bool = False) -> DataReport:
    """Reads, validates and tokenizes a data file as a client of a job would, and sums it up.

    Args:
        path: The data file, or what `load_data` read of it under `data`.
        tokenizer: The job's base tokenizer.
        max_seq_len: The job's `training.max_seq_len`.
        data: The job's `data:` settings (None: defaults).
        format: The file's format (None: told from the file).
        packing: The job's `training.packing`.

    Raises:
        InvalidInput: What the client would refuse, named as it would name it.
    """
    spec = as_data_spec(data)
    loaded = path if isinstance(path, LoadedData) else load_data(path, spec, format)
    tokenized = tokenize(loaded, tokenizer, max_seq_len, spec)
    packed_rows = None
    if packing:
        packed_rows = len(tokenize(loaded, tokenizer, max_seq_len, spec, packing=True))
    return DataReport(
        path=loaded.source.path, format=loaded.source.format, note=loaded.source.note, records=len(loaded),
        schemas=dict(loaded.schemas), template=tokenized.template, max_seq_len=max_seq_len,
        too_long=spec.too_long, percentiles=percentiles(tokenized.lengths), truncated=tokenized.truncated,
        dropped=tokenized.dropped, kept=tokenized.examples, packed_rows=packed_rows,
        example=decoded(tokenized, tokenizer),
    )


def percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """p50, p90, p99 (nearest rank) and max of the lengths."""
    ordered = sorted(lengths)
    if not ordered:
        return {}
    out = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in (50, 90, 99)}
    return {**out, "max": ordered[-1]}


def decoded(tokenized: TokenizedData, tokenizer: Any) -> list[tuple[str, bool]]:
    """The first item as decoded text segments, each marked with whether the loss covers it."""
    if not tokenized:
        return []
    item = tokenized[0]
    segments: list[tuple[list[int], bool]] = []
    for position, (token, label) in enumerate(zip(item["input_ids"], item["labels"], strict=True)):
        # The first label is never predicted (nothing comes before it); show it with what follows.
        trained = label != IGNORE_INDEX and position > 0
        if segments and segments[-1][1] == trained:
            segments[-1][0].append(token)
        else:
            segments.append(([token], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), trained)
            for ids, trained in segments]


def report_text(report: DataReport) -> str:
    """The report for people: one fact a line, then the example with its trained part marked."""
    schemas = ", ".join(f"{name} ({n})" for name, n in report.schemas.items())
    p = report.percentiles
    cut = (f"{report.truncated} truncated" if report.too_long == "truncate" else
           f"{report.dropped} dropped")
    lines = [
        f"file:      {report.path}",
        f"format:    {report.format}" + (f", {report.note}" if report.note else ""),
        f"schema:    {schemas}",
        f"records:   {report.records}",
    ]
    if report.template:
        lines.append(f"template:  {report.template}")
    lines += [
        f"tokens:    p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}  (after the template)",
        f"too long:  {cut} at max_seq_len {report.max_seq_len}",
        f"trained:   {report.kept} examples" + (f" in {report.packed_rows} packed rows"
                                                if report.packed_rows is not None else ""),
    ]
    if report.too_long == "truncate" and report.dropped:
        lines.append(f"           ({report.dropped} dropped: nothing left to train on once cut)")
    lines += ["", "first example (the loss covers the parts in [[ ]]):",
              "".join(f"[[{text}]]" if trained else text for text, trained in report.example)]
    return "\n".join(lines)
