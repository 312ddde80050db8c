"""Reading and checking published adapter directories (what consumers pull)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.crypto.signing import verify_manifest
from fedtune.errors import InvalidInput
from fedtune.hashing import file_sha256

MANIFEST = "fedtune.json"
# peft's file names (peft.utils.SAFETENSORS_WEIGHTS_NAME and CONFIG_NAME), here so that publishing
# and reading adapters need no peft import.
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    """The fedtune.json of an adapter directory."""
    path = adapter_dir / MANIFEST
    if not path.is_file():
        raise InvalidInput(f"{adapter_dir} is not a fedtune adapter: no {MANIFEST}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is not valid JSON: {e}") from e


def verify_adapter_dir(adapter_dir: Path, trusted_public_key: str | None = None) -> dict[str, Any]:
    """Checks the manifest's signature and every file it lists against its sha256.

    Args:
        adapter_dir: A published adapter directory.
        trusted_public_key: The coordinator's signing key (base64); when given the signer must be it.

    Returns:
        The manifest.

    Raises:
        InvalidInput: naming what failed: the signature, or the first missing or altered file.
    """
    manifest = read_manifest(adapter_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InvalidInput(f"{adapter_dir / MANIFEST} lists no files")
    verify_manifest(manifest, trusted_public_key)
    for name, sha in sorted(files.items()):
        if "/" in name or name.startswith("."):
            raise InvalidInput(f"{adapter_dir / MANIFEST} lists an unsafe file name {name!r}")
        path = adapter_dir / name
        if not path.is_file():
            raise InvalidInput(f"{path} is missing")
        if file_sha256(path) != sha:
            raise InvalidInput(f"{path} does not match its sha256 in {MANIFEST}")
    return manifest
