"""Safetensors blobs read and renamed without a tensor library.

The coordinator's job engines move adapters as bytes between the store, the compute process and the
published directory; they read names and shapes from a blob's header and rename tensors by
rewriting only the header, so an engine process never imports torch (~150 MiB per process).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from fedtune.errors import InvalidInput

Schema = dict[str, tuple[int, ...]]
_METADATA = "__metadata__"


def _split(data: bytes) -> tuple[dict[str, dict[str, object]], memoryview]:
    """The header (tensor entries and ``__metadata__``) and the data section of a blob."""
    if len(data) < 8:
        raise InvalidInput("not a safetensors blob: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise InvalidInput(f"not a safetensors blob: its header claims {n} bytes, the blob has {len(data) - 8}")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"not a safetensors blob: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise InvalidInput("not a safetensors blob: its header is not a JSON object")
    return header, memoryview(data)[8 + n :]


def shapes(data: bytes) -> Schema:
    """Each tensor's shape, by name."""
    header, _ = _split(data)
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()  # type: ignore[attr-defined]
            if k != _METADATA}


def metadata(data: bytes) -> dict[str, str]:
    """The blob's ``__metadata__`` string pairs (empty when it has none)."""
    header, _ = _split(data)
    meta = header.get(_METADATA) or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def rename(data: bytes, new_name: Callable[[str], str]) -> bytes:
    """The same blob with every tensor ``k`` called ``new_name(k)``; data and metadata unchanged.

    Raises:
        InvalidInput: ``data`` is not a safetensors blob, or two tensors would get one name.
    """
    header, body = _split(data)
    out: dict[str, object] = {}
    for key, entry in header.items():
        name = key if key == _METADATA else new_name(key)
        if name in out:
            raise InvalidInput(f"renaming tensors gives two the name {name!r}")
        out[name] = entry
    text = json.dumps(out, separators=(",", ":")).encode()
    # As safetensors itself writes it: the header padded with spaces to a multiple of 8 bytes.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(body)
