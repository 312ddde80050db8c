"""Content hashes of files and model directories (light: no torch import, for the CLI)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hashes a file without reading it into memory at once.

    Args:
        path: The file.

    Returns:
        The sha256 hex digest of its bytes.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir_hash(path: Path) -> str:
    """Hashes a model directory's content, so participants can check they hold the same base.

    Covers every regular file (symlinks to files are followed, as in hub snapshots) except hidden
    ones, by relative path and content; file times and the directory's own location do not matter.

    Args:
        path: The model directory.

    Returns:
        A sha256 hex digest.
    """
    entries: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            file = Path(root) / name
            if name.startswith(".") or not file.is_file():
                continue
            entries.append((file.relative_to(path).as_posix(), file_sha256(file)))
    digest = hashlib.sha256()
    for rel, file_digest in sorted(entries):
        digest.update(f"{rel}\0{file_digest}\n".encode())
    return digest.hexdigest()


# Weight files of formats other than safetensors (and their shard indexes): for other loaders.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".bin.index.json",
                  ".h5.index.json", ".msgpack.index.json")
_TORCH_BIN = (".bin", ".bin.index.json")
_DOCS = (".md", ".png", ".jpg", ".jpeg", ".gif", ".pdf")
_DOC_NAMES = ("license", "notice", "use_policy", "copying")


def loadable_files(path: Path) -> list[Path]:
    """The files of a model directory that loading the model and its tokenizer needs.

    What a hub snapshot holds beside them never travels to clients: subfolders (``original/``
    consolidated checkpoints, ``onnx/``, ...), documentation and licences, and weights in other
    formats when safetensors are there (``pytorch_model*.bin``, TensorFlow, Flax, GGUF). Without
    safetensors the PyTorch ``.bin`` weights and their index are kept. Hidden files are left out.

    Args:
        path: A model directory.

    Returns:
        The files, sorted by name (directly in ``path``).
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    has_safetensors = any(p.name.endswith(".safetensors") for p in files)
    keep = []
    for p in files:
        name = p.name.lower()
        if name.endswith(_DOCS) or name.startswith(_DOC_NAMES):
            continue
        if name.endswith(_OTHER_WEIGHTS) and (has_safetensors or not name.endswith(_TORCH_BIN)):
            continue
        keep.append(p)
    return keep
