"""`emulator.json`: what an emulator directory was built from and how (see `emulator.build_emulator`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.errors import InvalidInput
from fedtune.hashing import model_dir_hash

MANIFEST_NAME = "emulator.json"
MANIFEST_FORMAT = "fedtune-emulator/1"


@dataclass(frozen=True)
class DistillResult:
    """Distillation of the kept middle blocks, measured on the whole distillation data in eval mode.

    Attributes:
        steps: AdamW steps taken.
        lr: Learning rate.
        examples: Tokenized examples used.
        nmse_before: Normalised MSE mean((t - s)^2) / mean(t^2) between the full model's hidden
            state after its middle blocks (t) and the emulator's (s), before training.
        nmse_after: The same after training.
        lm_loss_before: The emulator's LM loss before training.
        lm_loss_after: The emulator's LM loss after training.
    """

    steps: int
    lr: float
    examples: int
    nmse_before: float
    nmse_after: float
    lm_loss_before: float
    lm_loss_after: float


@dataclass(frozen=True)
class EmulatorManifest:
    """The record in `emulator.json`.

    Emulator block i is full-model block `layer_map[i]`. The adapter (what clients tune, kept
    intact) is the first `bottom` and the last `top` emulator blocks; the blocks between them are the
    frozen, possibly distilled, pruned or quantized, stand-in for the full model's middle.

    Attributes:
        format: `MANIFEST_FORMAT`.
        source_model_hash: `fedtune.hashing.model_dir_hash` of the base model directory.
        model_type: The config's `model_type` ("llama", "gpt2", ...).
        blocks_path: Attribute path of the block list ("model.layers", "transformer.h", ...).
        layers_pattern: Its last part ("layers", "h"): peft's `layers_pattern`.
        n_layers_full: Blocks in the full model.
        n_layers: Blocks in the emulator.
        bottom: Adapter blocks at the bottom.
        top: Adapter blocks at the top.
        kept_middle: Full-model indices of the kept middle blocks.
        layer_map: For every emulator block, the full-model block it is (or stands for).
        keep: The requested fraction of middle blocks, if given as a fraction.
        prune: The pruning spec ("wanda:0.5"), if any.
        prune_sparsity: Measured fraction of zeros in the middle blocks' linear weights, if pruned.
        quantize: "int8" or "nf4" if the middle blocks' linear weights are quantized.
        quant_storage: How quantized weights are stored ("bitsandbytes": transformers'
            integration, `quantization_config` in config.json), if quantized.
        bytes_emulator: Bytes of all files in the emulator directory except this manifest.
        bytes_base: Bytes of all files in the base model directory.
        distill: Distillation results, if distilled.
        seed: Seed of the build's randomness (data order, random calibration tokens).
    """

    format: str
    source_model_hash: str
    model_type: str
    blocks_path: str
    layers_pattern: str
    n_layers_full: int
    n_layers: int
    bottom: int
    top: int
    kept_middle: list[int]
    layer_map: list[int]
    keep: float | None
    prune: str | None
    prune_sparsity: float | None
    quantize: str | None
    quant_storage: str | None
    bytes_emulator: int
    bytes_base: int
    distill: DistillResult | None
    seed: int

    @property
    def adapter_layers(self) -> list[int]:
        """Emulator indices of the adapter blocks (the first `bottom` and the last `top`)."""
        return [*range(self.bottom), *range(self.n_layers - self.top, self.n_layers)]

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EmulatorManifest:
        """Builds a manifest from parsed JSON.

        Raises:
            InvalidInput: Wrong format, missing or unknown fields, or a layer map that does not
                fit the layer counts.
        """
        if raw.get("format") != MANIFEST_FORMAT:
            raise InvalidInput(f"emulator manifest format is {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            missing, unknown = sorted(names - set(raw)), sorted(set(raw) - names)
            raise InvalidInput(f"emulator manifest fields wrong: missing {missing}, unknown {unknown}")
        distill = raw["distill"]
        try:
            manifest = cls(**{**raw, "distill": DistillResult(**distill) if distill is not None else None})
        except TypeError as e:
            raise InvalidInput(f"emulator manifest has a bad distill record: {e}") from e
        if len(manifest.layer_map) != manifest.n_layers or any(
            not 0 <= j < manifest.n_layers_full for j in manifest.layer_map
        ):
            raise InvalidInput(
                f"emulator manifest layer_map {manifest.layer_map} does not fit {manifest.n_layers} emulator "
                f"and {manifest.n_layers_full} full-model blocks"
            )
        return manifest


def read_emulator_manifest(emulator_dir: Path) -> EmulatorManifest:
    """Reads and checks `emulator.json` of an emulator directory.

    Args:
        emulator_dir: A directory written by `build_emulator`.

    Returns:
        The manifest.

    Raises:
        InvalidInput: No manifest, not JSON, or not a valid manifest.
    """
    path = emulator_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InvalidInput(f"{emulator_dir} is not an emulator: no {MANIFEST_NAME}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read the emulator manifest: {e}") from e
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path}: the emulator manifest is not a JSON object")
    return EmulatorManifest.from_dict(raw)


def check_emulator_for(emulator_dir: Path, base_dir: Path) -> EmulatorManifest:
    """Checks that an emulator was built from this base model.

    Args:
        emulator_dir: A directory written by `build_emulator`.
        base_dir: The full model directory the adapter will be plugged into.

    Returns:
        The emulator's manifest.

    Raises:
        InvalidInput: The manifest is missing or bad, or its source hash is not the base's.
    """
    manifest = read_emulator_manifest(emulator_dir)
    expected = model_dir_hash(base_dir)
    if manifest.source_model_hash != expected:
        raise InvalidInput(
            f"emulator at {emulator_dir} was built from another base model "
            f"(hash {manifest.source_model_hash[:12]}..., expected {expected[:12]}...)"
        )
    return manifest


def dir_bytes(path: Path) -> int:
    """Size of a model directory: its regular files (symlinks followed), as `model_dir_hash` sees them.

    Hidden files and folders and `emulator.json` are left out.
    """
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file()
        and f.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
