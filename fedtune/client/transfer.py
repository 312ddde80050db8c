"""Moving bytes: resumable, verified artifact downloads into a sha256 cache, chunked uploads."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
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


# Chunks the network may run ahead of the disk and the hash (bounded memory: 16 MiB).
_PIPELINE_DEPTH = 16
# Written bytes between early writebacks, so that the final fsync has only the tail left to flush.
_WRITEBACK_BYTES = 64 << 20


class _Stage:
    """A thread that applies ``step`` to each queued chunk, in order (after ``first``, if given)."""

    def __init__(self, name: str, step: Callable[[bytes], None], first: Callable[[], None] | None = None) -> None:
        self._step = step
        self._first = first
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_PIPELINE_DEPTH)
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, data: bytes | None) -> None:
        """Queues a chunk (None: the end), blocking while the queue is full."""
        while self._thread.is_alive():
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(data, timeout=1.0)
                return
            except queue.Full:
                continue
        if self.error is not None:
            raise self.error
        if data is not None:
            raise RuntimeError(f"{self._thread.name} thread ended early")

    def finish(self) -> None:
        """Waits for what is queued. Raises the stage's OSError, if it had one."""
        self.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            if self._first is not None:
                self._first()
            while (data := self._queue.get()) is not None:
                self._step(data)
        except OSError as e:  # handed to the receiving thread by put() and finish()
            self.error = e
            while self._queue.get() is not None:  # drain, so that the receiving thread never blocks
                pass


class _HashingWriter:
    """Appends chunks to a ``.part`` file and feeds them to a sha256, each on a thread of its own.

    The receiving thread only hands chunks over, so the hash (the slowest step: one sequential
    stream, a few hundred MB/s on a busy core) and the writes run while gRPC receives the next
    ones; hashlib and file writes release the GIL. A resumed download first hashes the prefix
    already on disk, once, and then goes on incrementally: nothing is read back afterwards.
    Every ``_WRITEBACK_BYTES`` a third thread starts writing the file back to disk (fdatasync),
    so the fsync before the rename does not wait for a whole base model's dirty pages.
    """

    def __init__(self, part: Path, prefix_bytes: int) -> None:
        self.digest = hashlib.sha256()
        self._part = part
        self._prefix = prefix_bytes
        self._file = part.open("ab")
        self._since_writeback = 0
        self._dirty = threading.Event()
        self._done = threading.Event()
        self._flusher = threading.Thread(target=self._writeback, name="download-writeback", daemon=True)
        self._flusher.start()
        self._hash = _Stage("download-hash", self.digest.update, self._hash_prefix)
        self._write = _Stage("download-write", self._append)

    def put(self, data: bytes) -> None:
        """Hands one chunk to the hash and the file (blocks while either is 16 chunks behind)."""
        self._write.put(data)
        self._hash.put(data)

    def close(self) -> str:
        """Writes and hashes what is queued, fsyncs, and returns the whole file's sha256 hex digest.

        Raises:
            OSError: reading the prefix or writing the file failed.
        """
        try:
            try:
                self._write.finish()
            finally:
                self._done.set()
                self._dirty.set()
                self._flusher.join()
                self._hash.finish()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        return self.digest.hexdigest()

    def _hash_prefix(self) -> None:
        with self._part.open("rb") as f:
            left = self._prefix
            while left and (block := f.read(min(CHUNK_SIZE, left))):
                self.digest.update(block)
                left -= len(block)

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._since_writeback += len(data)
        if self._since_writeback >= _WRITEBACK_BYTES:
            self._file.flush()
            self._dirty.set()
            self._since_writeback = 0

    def _writeback(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            if self._done.is_set():
                return
            try:
                os.fdatasync(self._file.fileno())
            except (OSError, ValueError):
                return  # only an early start: the final fsync in close() is what counts


class BlobCache:
    """Downloaded artifacts named by sha256, kept across rounds and restarts.

    A download in progress lives in ``SHA.part``; an interrupted one resumes from its length.
    A blob is only moved to its final name after its sha256 checks out: the bytes are hashed as
    they arrive (a resumed download hashes the prefix it already has once), never re-read.
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
            InvalidInput: the coordinator sent bytes that do not hash to ``sha256``, out of
                order, or more than ``size``.
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
        writer = _HashingWriter(part, offset)
        try:
            with tqdm(total=size, initial=offset, unit="B", unit_scale=True, desc=f"download {label}",
                      disable=not progress, leave=False) as bar:
                if offset < size:
                    stream: Iterator[pb.Chunk] = stub.Download(
                        pb.DownloadRequest(sha256=sha256, offset=offset), metadata=metadata, timeout=timeout)
                    for chunk in stream:
                        if chunk.offset != offset + got:
                            raise InvalidInput(f"download of {label}: chunk at {chunk.offset}, expected {offset + got}")
                        data = chunk.data  # each read of a bytes field copies it: once per chunk
                        if offset + got + len(data) > size:
                            raise InvalidInput(f"download of {label} is longer than its {size} bytes")
                        writer.put(data)
                        got += len(data)
                        bar.update(len(data))
        finally:
            # What arrived is kept (written and fsynced) for the next try, even when the call failed.
            digest = writer.close()
        if digest != sha256:
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

