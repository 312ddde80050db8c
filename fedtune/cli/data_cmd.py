"""`fedtune data`: check a data file the way a client of a job will read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.emulator_cmd import default_cache_dir
from fedtune.cli.options import Format, FormatOpt
from fedtune.errors import InvalidInput

app = typer.Typer(help="Training data: check a file as a client of a job reads it.", no_args_is_help=True)


@app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="Data file: JSONL, JSON, CSV, parquet, or a saved datasets directory.")],
    spec_file: Annotated[Path | None, typer.Option(
        "--spec", help="Job spec YAML: its data: section, max_seq_len, packing and base model apply.")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Tokenizer's model: a preset, a local directory or a hub id (default: the spec's "
                       "base_model, else tiny-llama).")] = None,
    data_format: Annotated[str | None, typer.Option(
        "--data-format", help="jsonl, json, csv, parquet or datasets (default: told from the file).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(
        "--max-seq-len", min=2, help="Longest sequence (default: the spec's training.max_seq_len, else 128).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Where presets are materialized (default: ~/.cache/fedtune).")] = None,
    fmt: FormatOpt = Format.text,
) -> None:
    """Validate FILE as a client will, and show what it trains on.

    Prints the format and schema found, the record count, token-length percentiles after the chat
    template, how many examples are cut (or left out) at max_seq_len, and the first example with
    the part the loss covers in [[ ]].
    """
    from fedtune.spec import JobSpec, TrainingSpec, parse_spec

    spec: JobSpec | None = None
    if spec_file is not None:
        if not spec_file.is_file():
            raise InvalidInput(f"job spec {spec_file} does not exist")
        spec = parse_spec(spec_file.read_text(), base_dir=spec_file.resolve().parent)
    # The file is read before the tokenizer loads: a bad record is named without the seconds of
    # importing transformers.
    from fedtune.data import check_data, load_data
    from fedtune.data.check import report_text

    loaded = load_data(file, spec.data if spec else None, data_format)
    from fedtune.models import load_tokenizer, resolve_base

    base = base or (spec.base_model if spec else "tiny-llama")
    tokenizer = load_tokenizer(resolve_base(base, cache_dir or default_cache_dir(),
                                            spec.base_revision if spec else None))
    training = spec.training if spec else TrainingSpec.model_validate({})
    report = check_data(loaded, tokenizer, max_seq_len or training.max_seq_len, spec.data if spec else None,
                        data_format, packing=training.packing)
    if fmt is Format.json:
        typer.echo(json.dumps({**report.as_dict(), "base": base}))
    else:
        typer.echo(f"base:      {base}\n" + report_text(report))
