"""Moving bytes: resumable, verified artifact downloads into a sha256 cache, chunked uploads."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_SIZE):
            h.update(block)
    return h.hexdigest()


class BlobCache:
    """Downloaded artifacts named by sha256, kept across rounds and restarts.

    A download in progress lives in ``SHA.part``; an interrupted one resumes from its length.
    A blob is only moved to its final name after its sha256 checks out.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Final location of a blob."""
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """Whether a verified copy is here."""
        return self.path(sha256).is_file()

    def fetch(self, stub: pb_grpc.ClientServiceStub, metadata: list[tuple[str, str]], sha256: str,
              size: int, label: str, progress: bool = True, timeout: float = 600.0) -> tuple[Path, int]:
        """Makes sure a blob is here, downloading what is missing.

        Returns:
            (path, bytes transferred now).

        Raises:
            grpc.RpcError: the call failed (the partial file is kept for the next try).
            InvalidInput: the coordinator sent bytes that do not hash to ``sha256``.
        """
        final = self.path(sha256)
        if final.is_file():
            return final, 0
        part = final.with_suffix(".part")
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        got = 0
        with part.open("ab") as f, tqdm(total=size, initial=offset, unit="B", unit_scale=True,
                                          desc=f"download {label}", disable=not progress, leave=False) as bar:
            if offset < size:
                stream: Iterator[pb.Chunk] = stub.Download(
                    pb.DownloadRequest(sha256=sha256, offset=offset), metadata=metadata, timeout=timeout)
                for chunk in stream:
                    if chunk.offset != offset + got:
                        raise InvalidInput(f"download of {label}: chunk at {chunk.offset}, expected {offset + got}")
                    f.write(chunk.data)
                    got += len(chunk.data)
                    bar.update(len(chunk.data))
            f.flush()
            os.fsync(f.fileno())
        if _sha256_file(part) != sha256:
            part.unlink()
            raise InvalidInput(f"download of {label} does not match its sha256 {sha256[:12]}; discarded")
        os.replace(part, final)
        return final, got


def materialize(cache: BlobCache, files: list[tuple[str, str]], target: Path) -> Path:
    """Lays out cached blobs as a model directory (hard links where possible, copies otherwise)."""
    for rel, sha in files:
        dest = target / rel
        if dest.resolve().parent != target.resolve() and target.resolve() not in dest.resolve().parents:
            raise InvalidInput(f"artifact path {rel!r} escapes the model directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            if dest.stat().st_ino == cache.path(sha).stat().st_ino or _sha256_file(dest) == sha:
                continue
            dest.unlink()
        try:
            os.link(cache.path(sha), dest)
        except OSError:
            dest.write_bytes(cache.path(sha).read_bytes())
    return target


def upload_messages(header: pb.UpdateHeader, payload: bytes) -> Iterator[pb.UploadMessage]:
    """The client stream of one upload: header, 1 MiB chunks, commit."""
    yield pb.UploadMessage(header=header)
    for off in range(0, len(payload), CHUNK_SIZE):
        yield pb.UploadMessage(chunk=pb.Chunk(offset=off, data=payload[off:off + CHUNK_SIZE], total_size=len(payload)))
    yield pb.UploadMessage(commit=pb.UploadCommit(sha256=header.sha256))


def upload(stub: pb_grpc.ClientServiceStub, metadata: list[tuple[str, str]], header: pb.UpdateHeader,
           payload: bytes, timeout: float = 600.0) -> pb.UploadReply:
    """Sends one update; raises grpc.RpcError on failure."""
    return stub.Upload(upload_messages(header, payload), metadata=metadata, timeout=timeout)

