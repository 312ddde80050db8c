"""Content-addressed blob store: every artifact and update is a file named by its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedtune.errors import NotFound

CHUNK_SIZE = 1 << 20  # 1 MiB: the unit of every tensor stream on the wire


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Immutable blobs under ``root/ab/abcdef...``, written atomically and fsynced.

    A blob is durable when ``put_*`` returns: it is written to a temp file, fsynced, renamed into
    place and its directory fsynced, so a crash leaves either the whole blob or nothing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFound(f"no artifact {sha256!r}: not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        try:
            return self.path(sha256).is_file()
        except NotFound:
            return False

    def size(self, sha256: str) -> int:
        """Size in bytes of a stored blob."""
        p = self.path(sha256)
        if not p.is_file():
            raise NotFound(f"no artifact {sha256}")
        return p.stat().st_size

    def put_bytes(self, data: bytes) -> str:
        """Stores bytes and returns their sha256."""
        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return digest
        return self._write(iter([data]))

    def put_file(self, source: Path) -> str:
        """Stores a copy of a file and returns its sha256, streaming: a multi-GB base model file
        is never held in memory."""
        with source.open("rb") as src:
            return self._write(iter(lambda: src.read(CHUNK_SIZE), b""))

    def _write(self, blocks: Iterator[bytes]) -> str:
        """Writes blocks to a temp file while hashing, fsyncs, and renames it to its digest."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for block in blocks:
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            target = self.path(sha)
            if target.is_file():
                Path(tmp).unlink()
                return sha
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return sha

    def read(self, sha256: str) -> bytes:
        """Whole blob as bytes."""
        p = self.path(sha256)
        if not p.is_file():
            raise NotFound(f"no artifact {sha256}")
        return p.read_bytes()

    def iter_chunks(self, sha256: str, offset: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yields the blob from ``offset`` in chunks of ``chunk_size`` bytes."""
        p = self.path(sha256)
        if not p.is_file():
            raise NotFound(f"no artifact {sha256}")
        # Unbuffered: each chunk is read straight into its own bytes object (no second copy
        # through a read buffer); sequential read-ahead for bases that are not in the page cache.
        with p.open("rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), offset, 0, os.POSIX_FADV_SEQUENTIAL)
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk
