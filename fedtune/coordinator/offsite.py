"""Offsite jobs: the emulator clients get instead of the full base, and the plug-in mapping back.

Clients tune the emulator's adapter blocks (its first `bottom` and last `top` blocks): LoRA on
them, or the blocks' own weights (``offsite.tune: blocks``). Those blocks are the full model's
own, so the aggregate plugs into the full model once each emulator block index is replaced by the
full-model block it is (``layer_map``); tensor names are the same in both cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.compression.emulator_manifest import EmulatorManifest, check_emulator_for, read_emulator_manifest
from fedtune.compression.plugin import full_model_name, to_full_model
from fedtune.spec import JobSpec, OffsiteSpec
from fedtune.tensor_blobs import rename

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_KEEP = 0.5


@dataclass(frozen=True)
class OffsitePlan:
    """An offsite job's emulator and how its adapter maps onto the full model."""

    emulator_dir: Path
    manifest: EmulatorManifest

    @property
    def layers_pattern(self) -> str:
        """peft's name for the block list ("layers", "h")."""
        return self.manifest.layers_pattern

    @property
    def emulator_layers(self) -> list[int]:
        """Emulator indices of the adapter blocks."""
        m = self.manifest
        return list(range(m.bottom)) + list(range(m.n_layers - m.top, m.n_layers))

    @property
    def full_layers(self) -> list[int]:
        """Full-model indices of the adapter blocks."""
        return [self.manifest.layer_map[i] for i in self.emulator_layers]

    def to_full(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapter tensors renamed from emulator blocks to full-model blocks."""
        return to_full_model(state, self.manifest.layer_map, self.layers_pattern)

    def to_full_blob(self, blob: bytes) -> bytes:
        """The same, on a safetensors blob (without loading its tensors)."""
        return rename(blob, lambda key: full_model_name(key, self.manifest.layer_map, self.layers_pattern))

    def summary(self) -> dict[str, object]:
        """What the published manifest records about the emulator."""
        m = self.manifest
        return {"source_model_hash": m.source_model_hash, "n_layers_full": m.n_layers_full, "n_layers": m.n_layers,
                "adapter_layers_full": self.full_layers, "kept_middle": m.kept_middle, "quantize": m.quantize,
                "prune": m.prune, "bytes_emulator": m.bytes_emulator, "bytes_base": m.bytes_base}


def prepare_emulator(spec: JobSpec, base_dir: Path, root: Path) -> OffsitePlan:
    """The job's emulator: the prebuilt one it names (checked against the base), or one built now.

    Built emulators are cached under ``root`` by base hash and settings, so jobs that ask for the
    same emulator share it.

    Raises:
        InvalidInput: a prebuilt emulator from another base, or settings the builder refuses.
    """
    off = spec.offsite or OffsiteSpec.model_validate({})
    if off.emulator:
        check_emulator_for(Path(off.emulator), base_dir)
        return OffsitePlan(Path(off.emulator), read_emulator_manifest(Path(off.emulator)))
    from fedtune.compression.emulator import build_emulator
    from fedtune.hashing import model_dir_hash

    keep = off.keep if off.keep is not None or off.keep_layers is not None else DEFAULT_KEEP
    # What clients tune does not change the emulator: jobs that differ only in it share one.
    settings = {"base": model_dir_hash(base_dir), **off.model_dump(mode="json", exclude={"tune"}), "keep": keep}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = root / key
    if not (out / "emulator.json").exists():
        log.info("building emulator %s of %s", key, base_dir)
        build_emulator(base_dir, out, bottom=off.adapter_layers[0], top=off.adapter_layers[1], keep=keep,
                       keep_layers=off.keep_layers, distill_data=Path(off.distill_data) if off.distill_data else None,
                       distill_steps=off.distill_steps, prune=off.prune, quantize=off.quantize)
    return OffsitePlan(out, read_emulator_manifest(out))


def plan_for(emulator_dir: str | None) -> OffsitePlan | None:
    """The plan of a job from its stored emulator dir (None for a federated job)."""
    if not emulator_dir:
        return None
    return OffsitePlan(Path(emulator_dir), read_emulator_manifest(Path(emulator_dir)))
