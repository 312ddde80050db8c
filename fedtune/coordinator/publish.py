"""Publishing: an aggregated round becomes a directory plain peft loads, plus fedtune.json."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune import __version__
from fedtune.adapters import ADAPTER_CONFIG_NAME, MANIFEST, SAFETENSORS_WEIGHTS_NAME
from fedtune.crypto.signing import sign_manifest
from fedtune.errors import FedtuneError
from fedtune.hashing import file_sha256
from fedtune.spec import JobSpec
from fedtune.tensor_blobs import shapes

if TYPE_CHECKING:
    from fedtune.coordinator.state import Job


def publish_adapter(
    root: Path,
    *,
    job_id: str,
    job_name: str,
    rnd: int,
    state: bytes,
    peft: Any,
    base_model: str,
    base_hash: str,
    metrics: dict[str, float],
    contributors: int,
    adapter_config: str,
    signer: Ed25519PrivateKey | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Writes ``root/JOB/round-N`` atomically and returns its path and manifest.

    The directory is built under a temporary name and renamed into place, so a crash leaves either
    the complete adapter or none; publishing the same round again replaces it.

    Args:
        state: The adapter's tensors as a safetensors blob, keyed as peft saves them.
        adapter_config: The job's ``adapter_config.json`` (see :func:`job_adapter_config`).

    Raises:
        FedtuneError: ``adapter_config`` would not load ``state`` with peft.
    """
    check_config_covers(adapter_config, shapes(state))
    final = root / job_id / f"round-{rnd}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Written as given: the engine that publishes moves tensors as bytes and never loads them.
    (tmp / SAFETENSORS_WEIGHTS_NAME).write_bytes(state)
    (tmp / ADAPTER_CONFIG_NAME).write_text(adapter_config)
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest: dict[str, Any] = {
        "format": "fedtune.adapter/1",
        "job": job_id,
        "job_name": job_name,
        "round": rnd,
        "base_model": base_model,
        "base_model_hash": base_hash,
        "peft": peft.model_dump(mode="json"),
        "metrics": dict(metrics),  # a copy: the caller's dict keeps changing after signing
        "contributors": contributors,
        "files": files,
        "created": time.time(),
        "fedtune_version": __version__,
        **(extra or {}),
    }
    if signer is not None:
        manifest = sign_manifest(manifest, signer)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    for p in tmp.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final, manifest


def published_adapter_config(peft: dict[str, Any], base_model: str, layers: list[int] | None = None,
                             layers_pattern: str | None = None, *, whole_blocks: bool = False) -> str:
    """The ``adapter_config.json`` a job publishes (for engines that run without peft loaded).

    Args:
        peft: The job's ``peft`` mapping (its spec's options: any registered method).
        base_model: What the config names as base.
        layers: Full-model indices of the blocks the adapter is confined to (offsite jobs).
        layers_pattern: Name of the block list, with ``layers``.
        whole_blocks: The adapter is those blocks' own weights (``offsite.tune: blocks``), not LoRA.
    """
    from fedtune.methods import config_for
    from fedtune.peft_io import adapter_config_text, lora_config

    config: Any
    if whole_blocks:
        config = lora_config(8, 16.0, 0.0, ["q_proj"], layers, layers_pattern, whole_blocks=True)
    else:
        scope = {"layers_to_transform": layers, "layers_pattern": layers_pattern} if layers is not None else {}
        config = config_for({**peft, **scope})
    return adapter_config_text(config, base_model)


def job_adapter_config(job: Job, spec: JobSpec) -> str:
    """The ``adapter_config.json`` every round of ``job`` publishes: LoRA (or, for ``offsite.tune:
    blocks``, the blocks themselves) on the full base, at the full model's block indices."""
    from fedtune.coordinator.offsite import plan_for

    plan = plan_for(job.emulator_dir)
    return published_adapter_config(spec.peft.model_dump(mode="json"), job.base_model, plan.full_layers if plan else None,
                                    plan.layers_pattern if plan else None, whole_blocks=spec.tunes_blocks)


def check_config_covers(adapter_config: str, state: Iterable[str]) -> None:
    """Checks that peft, loading ``adapter_config``, takes every tensor of ``state``.

    A method's own tensor (``...lora_A.weight`` for LoRA, ``...hada_w1_a`` for LoHa, see each
    method's ``markers``) goes into a layer peft injects; any other tensor only into a module the
    config lists in ``modules_to_save``. A config made for the wrong kind of adapter would be
    published, and peft would then silently leave the tuned weights out.

    Raises:
        FedtuneError: naming a tensor the config does not cover.
    """
    from fedtune.methods import method_of_config

    config = json.loads(adapter_config)
    saved = config.get("modules_to_save") or []
    method = method_of_config(config)
    markers = method.markers if method is not None else ()
    for key in state:
        if any(m in key for m in markers) or any(f".{name}." in f".{key}" for name in saved):
            continue
        raise FedtuneError(f"the published adapter config does not load tensor {key!r} (modules_to_save: "
                           f"{saved or 'none'}); the adapter config and the tensors disagree")
