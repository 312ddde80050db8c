"""Reading and checking published adapter directories (what consumers pull)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.errors import InvalidInput
from fedtune.hashing import file_sha256

MANIFEST = "fedtune.json"


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    """The fedtune.json of an adapter directory."""
    path = adapter_dir / MANIFEST
    if not path.is_file():
        raise InvalidInput(f"{adapter_dir} is not a fedtune adapter: no {MANIFEST}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is not valid JSON: {e}") from e


def verify_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """Checks every file listed in the manifest against its sha256.

    Returns:
        The manifest.

    Raises:
        InvalidInput: naming the first missing or altered file.
    """
    manifest = read_manifest(adapter_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InvalidInput(f"{adapter_dir / MANIFEST} lists no files")
    for name, sha in sorted(files.items()):
        path = adapter_dir / name
        if not path.is_file():
            raise InvalidInput(f"{path} is missing")
        if file_sha256(path) != sha:
            raise InvalidInput(f"{path} does not match its sha256 in {MANIFEST}")
    return manifest
