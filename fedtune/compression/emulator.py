"""Offsite-Tuning emulators (Xiao, Lin and Han 2023, arXiv 2302.04870).

The owner of a model keeps the full weights and hands clients an emulator: the first `bottom` and
last `top` decoder blocks unchanged (the adapter, which clients tune, e.g. with LoRA) around a
uniform subset of the middle blocks, optionally distilled towards the full middle, pruned, and
quantized. An adapter trained on the emulator then plugs into the full model: emulator block i is
full block `layer_map[i]` (see `fedtune.compression.plugin`).

The emulator is an ordinary Hugging Face model directory (config with the reduced layer count,
the base's tokenizer files) plus `emulator.json` (`EmulatorManifest`). How quantized weights are
stored and loaded: `fedtune.compression.emulator_storage`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fedtune.compression.blocks import BlockList, find_blocks, install_blocks
from fedtune.compression.distill import distill_middle
from fedtune.compression.emulator_manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    DistillResult,
    EmulatorManifest,
    check_emulator_for,
    dir_bytes,
    read_emulator_manifest,
)
from fedtune.compression.emulator_storage import (
    copy_tokenizer_files,
    load_emulator,
    save_quantized,
    unquantized_linear_names,
)
from fedtune.compression.pruning import (
    PruneSpec,
    magnitude_prune,
    parse_prune_spec,
    wanda_prune,
    zero_fraction,
)
from fedtune.data import collate, load_data, tokenize
from fedtune.errors import InvalidInput
from fedtune.hashing import model_dir_hash
from fedtune.models import MODEL_BUILD_LOCK, load_causal_lm, load_tokenizer
from fedtune.quantization import QUANTIZATIONS, check_quantization_supported

__all__ = [
    "DistillResult",
    "EmulatorManifest",
    "build_emulator",
    "check_emulator_for",
    "load_emulator",
    "read_emulator_manifest",
    "uniform_indices",
]

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
# Wanda calibration: at most this many distillation examples, else random token sequences.
_CALIBRATION_EXAMPLES = 32
_RANDOM_CALIBRATION = (8, 64)  # sequences, tokens


@dataclass(frozen=True)
class _Plan:
    """Everything `build_emulator` checked before starting work."""

    n_layers: int
    kept_middle: list[int]
    layer_map: list[int]
    prune: PruneSpec | None
    model_type: str
    blocks_path: str


def uniform_indices(n: int, k: int) -> list[int]:
    """k of n positions, evenly spread, always including the first and (for k > 1) the last.

    Args:
        n: Positions to choose from.
        k: How many to keep, 1 <= k <= n.

    Returns:
        `round(i * (n - 1) / (k - 1))` for i in 0..k-1 ([0] for k = 1), strictly increasing.
    """
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def build_emulator(
    base_dir: Path,
    out_dir: Path,
    *,
    bottom: int,
    top: int,
    keep: float | None = None,
    keep_layers: int | None = None,
    distill_data: Path | None = None,
    distill_steps: int = 0,
    prune: str | None = None,
    quantize: str | None = None,
    seed: int = 0,
    distill_lr: float = 1e-4,
    distill_batch_size: int = 8,
    max_seq_len: int = 256,
) -> EmulatorManifest:
    """Builds an emulator of the model in `base_dir` and writes it to `out_dir`.

    Steps, in order: keep the first `bottom` and last `top` blocks and k of the n_middle blocks
    between them (`uniform_indices`; k is `keep_layers`, or `round(keep * n_middle)` but at least
    1); distill the kept middle blocks if `distill_steps` > 0; prune their linear weights; save;
    quantize their linear weights. Works on CPU in fp32; saves in the base's dtype.

    Args:
        base_dir: The full model directory (see `fedtune.models.resolve_base`).
        out_dir: Where to write the emulator; must not exist or be empty. Written atomically.
        bottom: Adapter blocks at the bottom (kept intact).
        top: Adapter blocks at the top (kept intact).
        keep: Fraction of the middle blocks to keep, in (0, 1].
        keep_layers: Number of middle blocks to keep (instead of `keep`).
        distill_data: A data file (any format `fedtune.data.load_data` reads) for distillation and Wanda
            calibration.
        distill_steps: AdamW steps of distillation (0: none).
        prune: "magnitude:S" or "wanda:S" for the kept middle blocks' linear weights.
        quantize: "int8" or "nf4" for the kept middle blocks' linear weights.
        seed: Seed of the data order and of random calibration tokens.
        distill_lr: Distillation learning rate.
        distill_batch_size: Distillation batch size.
        max_seq_len: Longest distillation sequence, in tokens.

    Returns:
        The manifest written to `out_dir / "emulator.json"`.

    Raises:
        InvalidInput: Any bad argument, an unsupported or too shallow base model, a non-empty
            `out_dir`, bad distillation data, or a quantization this platform cannot run; all
            raised before the model is loaded.
    """
    plan = _check(base_dir, out_dir, bottom=bottom, top=top, keep=keep, keep_layers=keep_layers,
                  distill_data=distill_data, distill_steps=distill_steps, prune=prune, quantize=quantize,
                  distill_lr=distill_lr, distill_batch_size=distill_batch_size, max_seq_len=max_seq_len)
    batches: list[dict[str, torch.Tensor]] = []
    calibration: list[torch.Tensor] = []
    if distill_data is not None:
        tokenizer = load_tokenizer(base_dir)
        items = tokenize(load_data(distill_data), tokenizer, max_seq_len)
        batches = [collate(items[i:i + distill_batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(items), distill_batch_size)]
        calibration = [torch.tensor([item["input_ids"]]) for item in items[:_CALIBRATION_EXAMPLES]]
    source_hash = model_dir_hash(base_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            # Quantizing re-loads the emulator saved in floating point, once this model is freed.
            fp_dir = Path(tempfile.mkdtemp(prefix=".fp-", dir=staging)) if quantize else staging
            distilled, sparsity, skip = _build_in(fp_dir, base_dir, plan, bottom, top, batches, calibration,
                                                  distill_steps, distill_lr, generator)
        if quantize:
            save_quantized(fp_dir, staging, quantize, skip, _checkpoint_dtype(base_dir))
            shutil.rmtree(fp_dir)
        copy_tokenizer_files(base_dir, staging)
        manifest = EmulatorManifest(
            format=MANIFEST_FORMAT, source_model_hash=source_hash, model_type=plan.model_type,
            blocks_path=plan.blocks_path, layers_pattern=plan.blocks_path.rsplit(".", 1)[-1],
            n_layers_full=plan.n_layers, n_layers=len(plan.layer_map), bottom=bottom, top=top,
            kept_middle=plan.kept_middle, layer_map=plan.layer_map, keep=keep,
            prune=str(plan.prune) if plan.prune else None, prune_sparsity=sparsity, quantize=quantize,
            quant_storage="bitsandbytes" if quantize else None, bytes_emulator=dir_bytes(staging),
            bytes_base=dir_bytes(base_dir), distill=distilled, seed=seed,
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        try:
            if out_dir.exists():
                out_dir.rmdir()  # still empty unless a concurrent build finished first
            os.rename(staging, out_dir)
        except OSError as e:
            if not (out_dir / MANIFEST_NAME).is_file():
                raise InvalidInput(f"cannot write the emulator to {out_dir}: {e}") from e
            logger.info("emulator %s was built concurrently; keeping that copy", out_dir)
            return read_emulator_manifest(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("emulator of %s: %d of %d blocks, %d bytes vs %d, at %s", base_dir, manifest.n_layers,
                manifest.n_layers_full, manifest.bytes_emulator, manifest.bytes_base, out_dir)
    return manifest


def _build_in(save_dir: Path, base_dir: Path, plan: _Plan, bottom: int, top: int,
              batches: list[dict[str, torch.Tensor]], calibration: list[torch.Tensor], distill_steps: int,
              distill_lr: float, generator: torch.Generator) -> tuple[DistillResult | None, float | None, list[str]]:
    """Loads the base, makes the emulator and saves it in floating point into `save_dir`.

    Returns:
        Distillation results, measured sparsity, and the full names of the linear layers outside
        the kept middle blocks (what quantization must skip).
    """
    model = load_causal_lm(base_dir, CPU)
    model.requires_grad_(False)
    found = find_blocks(model)
    middle = range(bottom, bottom + len(plan.kept_middle))
    # Distillation trains copies, so the full model's middle stays the teacher.
    emulator = [copy.deepcopy(found.modules[j]) if i in middle and distill_steps else found.modules[j]
                for i, j in enumerate(plan.layer_map)]
    kept = emulator[middle.start:middle.stop]
    distilled = None
    if distill_steps:
        distilled = distill_middle(
            model,
            use_full=lambda: install_blocks(model, found, found.modules, range(len(found))),
            use_emulator=lambda: install_blocks(model, found, emulator, plan.layer_map),
            teacher_tap=found.modules[plan.n_layers - top - 1],
            student_tap=kept[-1],
            trainable=kept,
            batches=batches, steps=distill_steps, lr=distill_lr, generator=generator,
        )
    install_blocks(model, found, emulator, plan.layer_map)
    sparsity = None
    if plan.prune is not None:
        if plan.prune.method == "magnitude":
            magnitude_prune(kept, plan.prune.sparsity)
        else:
            wanda_prune(model, kept, plan.prune.sparsity, calibration or _random_calibration(model.config, generator))
        sparsity = zero_fraction(kept)
    save_dtype = _checkpoint_dtype(base_dir)
    if save_dtype.is_floating_point and save_dtype != torch.float32:
        model.to(save_dtype)  # type: ignore[arg-type]
    model.eval().save_pretrained(save_dir)
    return distilled, sparsity, unquantized_linear_names(model, found.path, middle)


def _check(base_dir: Path, out_dir: Path, *, bottom: int, top: int, keep: float | None, keep_layers: int | None,
           distill_data: Path | None, distill_steps: int, prune: str | None, quantize: str | None,
           distill_lr: float, distill_batch_size: int, max_seq_len: int) -> _Plan:
    """Checks every argument and the base model's config, without loading weights."""
    if bottom < 0 or top < 0 or bottom + top < 1:
        raise InvalidInput(f"adapter layers must be two counts >= 0 with at least one block, got {bottom},{top}")
    if (keep is None) == (keep_layers is None):
        raise InvalidInput("give exactly one of keep (a fraction of the middle blocks) and keep_layers (a count)")
    if keep is not None and not 0 < keep <= 1:
        raise InvalidInput(f"keep must be a fraction in (0, 1], got {keep:g}")
    if keep_layers is not None and keep_layers < 1:
        raise InvalidInput(f"keep_layers must be at least 1, got {keep_layers}")
    if distill_steps < 0:
        raise InvalidInput(f"distill_steps must be >= 0, got {distill_steps}")
    if distill_steps and distill_data is None:
        raise InvalidInput(f"distill_steps={distill_steps} needs distill_data")
    if distill_lr <= 0 or distill_batch_size < 1 or max_seq_len < 2:
        raise InvalidInput(f"distillation needs lr > 0, batch size >= 1 and max_seq_len >= 2, got "
                           f"{distill_lr:g}, {distill_batch_size}, {max_seq_len}")
    spec = parse_prune_spec(prune) if prune is not None else None
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise InvalidInput(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
        check_quantization_supported(quantize, CPU)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInput(f"emulator output {out_dir} exists and is not an empty directory")
    if distill_data is not None:
        load_data(distill_data)  # fails on a bad record before any model work
    found, model_type = _blocks_of(base_dir)
    n = len(found)
    n_middle = n - bottom - top
    if n_middle < 1:
        raise InvalidInput(f"base model at {base_dir} has {n} decoder blocks; adapter layers {bottom},{top} "
                           f"need at least {bottom + top + 1}")
    if keep_layers is not None and keep_layers > n_middle:
        raise InvalidInput(f"keep_layers={keep_layers} is more than the {n_middle} middle blocks of {base_dir}")
    k = keep_layers if keep_layers is not None else max(1, round(keep * n_middle))  # type: ignore[operator]
    kept = [bottom + i for i in uniform_indices(n_middle, k)]
    return _Plan(n_layers=n, kept_middle=kept, layer_map=[*range(bottom), *kept, *range(n - top, n)],
                 prune=spec, model_type=model_type, blocks_path=found.path)


def _blocks_of(base_dir: Path) -> tuple[BlockList, str]:
    # The model is built on the meta device: its structure without allocating weights.
    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot read a model config from {base_dir}: {e}") from e
    if getattr(config, "quantization_config", None) is not None:
        raise InvalidInput(f"base model at {base_dir} is already quantized; build emulators from a floating-point base")
    try:
        with MODEL_BUILD_LOCK, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise InvalidInput(f"architecture {config.model_type!r} is not supported: not a causal LM ({e})") from e
    return find_blocks(model), str(config.model_type)


def _checkpoint_dtype(base_dir: Path) -> torch.dtype:
    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _random_calibration(config: object, generator: torch.Generator) -> list[torch.Tensor]:
    count, length = _RANDOM_CALIBRATION
    length = min(length, getattr(config, "max_position_embeddings", length) or length)
    vocab = int(config.vocab_size)  # type: ignore[attr-defined]
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]
