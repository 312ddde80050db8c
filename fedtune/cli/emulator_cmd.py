"""`fedtune emulator`: build Offsite-Tuning emulators of a base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fedtune.errors import InvalidInput

app = typer.Typer(help="Offsite-Tuning emulators: a compressed stand-in of a base model.", no_args_is_help=True)


def default_cache_dir() -> Path:
    """Where presets are materialized: $XDG_CACHE_HOME/fedtune, else ~/.cache/fedtune."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedtune"


def parse_adapter_layers(value: str) -> tuple[int, int]:
    """Parses "BOTTOM,TOP" into two block counts.

    Raises:
        InvalidInput: Not two comma-separated integers.
    """
    parts = value.split(",")
    try:
        bottom, top = (int(p) for p in parts)
    except ValueError as e:
        raise InvalidInput(f"--adapter-layers must be BOTTOM,TOP (two block counts), got {value!r}") from e
    return bottom, top


@app.command("build")
def build(
    base: Annotated[str, typer.Option("--base", help="Base model: a preset name, a local directory or a hub id.")],
    adapter_layers: Annotated[str, typer.Option(
        "--adapter-layers", help="BOTTOM,TOP: blocks at each end that clients tune, kept intact.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the emulator into (new or empty).")],
    keep: Annotated[float | None, typer.Option(
        "--keep", help="Fraction of the middle blocks to keep, in (0, 1].")] = None,
    keep_layers: Annotated[int | None, typer.Option(
        "--keep-layers", help="Number of middle blocks to keep (instead of --keep).")] = None,
    distill: Annotated[Path | None, typer.Option(
        "--distill", help="Data file (JSONL, JSON, CSV, parquet, datasets dir) to distill the kept middle blocks "
                          "on (and calibrate Wanda).")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Distillation steps with --distill (0: use the data only for Wanda calibration).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Distillation learning rate.")] = 1e-4,
    prune: Annotated[str | None, typer.Option(
        "--prune", help="magnitude:S or wanda:S, S the sparsity of the middle blocks' linear weights.")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8 or nf4: quantize the middle blocks' linear weights (bitsandbytes).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data order and calibration tokens.")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Where presets are materialized (default: ~/.cache/fedtune).")] = None,
) -> None:
    """Build an emulator of BASE and print its directory; a summary goes to stderr."""
    bottom, top = parse_adapter_layers(adapter_layers)
    if distill is not None and steps is None:
        raise InvalidInput("--distill needs --steps N (0: use the data only for Wanda calibration)")
    if steps is not None and distill is None:
        raise InvalidInput("--steps needs --distill DATA")
    # Imported here: torch and transformers load slowly, and other commands do not need them.
    from fedtune.compression.emulator import build_emulator
    from fedtune.models import resolve_base

    base_dir = resolve_base(base, cache_dir or default_cache_dir())
    manifest = build_emulator(
        base_dir, out, bottom=bottom, top=top, keep=keep, keep_layers=keep_layers, distill_data=distill,
        distill_steps=steps or 0, prune=prune, quantize=quantize, seed=seed, distill_lr=lr,
    )
    summary = (
        f"emulator: {manifest.n_layers} of {manifest.n_layers_full} blocks "
        f"(adapter {bottom}+{top}, middle {manifest.kept_middle}), "
        f"{manifest.bytes_emulator:,} bytes vs {manifest.bytes_base:,} for the base "
        f"({manifest.bytes_emulator / manifest.bytes_base:.0%})"
    )
    if manifest.distill is not None:
        summary += f", distilled nmse {manifest.distill.nmse_before:.4f} -> {manifest.distill.nmse_after:.4f}"
    typer.echo(summary, err=True)
    typer.echo(str(out))
