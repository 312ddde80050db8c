"""Client-side transfers: resumable, verified downloads, against a real coordinator and a scripted stream."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from fedtune.client import transfer
from fedtune.client.transfer import CHUNK_SIZE, BlobCache, materialize
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, make_spec
from tests.test_rpc_contract import RawClient


def test_interrupted_download_resumes_from_its_partial_file(coordinator, admin: Admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec())
    client = RawClient(coordinator.address, admin.token(job))
    ref = max(client.task().base_files, key=lambda f: f.size)
    whole = client.download(ref.sha256)
    cache = BlobCache(tmp_path / "cache")
    # As if the previous attempt died after 1000 bytes.
    cache.path(ref.sha256).with_suffix(".part").write_bytes(whole[:1000])
    path, transferred = cache.fetch(client.stub, client.md("Download"), ref.sha256, ref.size, ref.path, progress=False)
    assert transferred == ref.size - 1000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
    # Cached now: a second fetch moves nothing.
    assert cache.fetch(client.stub, client.md("Download"), ref.sha256, ref.size, ref.path, progress=False) == (path, 0)


def test_corrupt_partial_download_is_discarded(coordinator, admin: Admin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = admin.create_job(make_spec())
    client = RawClient(coordinator.address, admin.token(job))
    ref = max(client.task().base_files, key=lambda f: f.size)
    cache = BlobCache(tmp_path / "cache")
    cache.path(ref.sha256).with_suffix(".part").write_bytes(b"garbage!" * 10)
    with pytest.raises(InvalidInput, match="does not match its sha256"):
        cache.fetch(client.stub, client.md("Download"), ref.sha256, ref.size, ref.path, progress=False)
    assert not cache.has(ref.sha256)
    assert not cache.path(ref.sha256).with_suffix(".part").exists()
    # The retry starts over and succeeds.
    _path, transferred = cache.fetch(client.stub, client.md("Download"), ref.sha256, ref.size, ref.path, progress=False)
    assert transferred == ref.size and cache.has(ref.sha256)


def test_materialize_refuses_paths_that_escape(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    data = b"{}"
    sha = hashlib.sha256(data).hexdigest()
    cache.path(sha).write_bytes(data)
    target = tmp_path / "model"
    materialize(cache, [("config.json", sha), ("sub/tokenizer.json", sha)], target)
    assert (target / "sub" / "tokenizer.json").read_bytes() == data
    with pytest.raises(InvalidInput, match="escapes"):
        materialize(cache, [("../evil.json", sha)], target)
    assert not (tmp_path / "evil.json").exists()


class _Interrupted(grpc.RpcError):
    """What a dropped connection looks like to the caller."""


class _FakeDownloads:
    """A Download endpoint serving one blob from the requested offset in 1 MiB chunks; it can drop the
    stream after ``fail_after`` chunks, send a chunk out of order, or send bytes past the end."""

    def __init__(self, blob: bytes, fail_after: int | None = None, skip: bool = False, extra: bytes = b"") -> None:
        self.blob, self.fail_after, self.skip, self.extra = blob, fail_after, skip, extra
        self.offsets: list[int] = []

    def Download(self, request: pb.DownloadRequest, metadata: object = None, timeout: float | None = None):  # type: ignore[no-untyped-def]
        self.offsets.append(request.offset)
        data = self.blob[request.offset:] + self.extra
        for i, off in enumerate(range(0, len(data), CHUNK_SIZE)):
            if self.fail_after is not None and i == self.fail_after:
                raise _Interrupted()
            at = request.offset + off + (1 if self.skip and i == 1 else 0)
            yield pb.Chunk(offset=at, data=data[off:off + CHUNK_SIZE], total_size=len(self.blob))


@pytest.fixture
def hashed_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes are fed to ``hashlib.sha256`` (the tests hash with ``hashlib.new``)."""
    fed: list[int] = [0]
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self._h = real()
            self.update(data)

        def update(self, data: bytes) -> None:
            fed[0] += len(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(transfer.hashlib, "sha256", Counting)
    return fed


def test_dropped_download_keeps_what_arrived_and_resumes_hashing_each_byte_once(
        tmp_path: Path, hashed_bytes: list[int]) -> None:
    blob = os.urandom(3 * CHUNK_SIZE + 12345)
    sha = hashlib.new("sha256", blob).hexdigest()
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(grpc.RpcError):
        cache.fetch(_FakeDownloads(blob, fail_after=2), [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    part = cache.path(sha).with_suffix(".part")
    # The two chunks that arrived are on disk, intact, for the next try.
    assert part.read_bytes() == blob[:2 * CHUNK_SIZE]
    hashed_bytes[0] = 0
    server = _FakeDownloads(blob)
    path, moved = cache.fetch(server, [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    assert server.offsets == [2 * CHUNK_SIZE] and moved == len(blob) - 2 * CHUNK_SIZE
    assert path.read_bytes() == blob and not part.exists()
    # The prefix was hashed once on resume and the rest as it arrived: nothing was read twice.
    assert hashed_bytes[0] == len(blob)


def test_fresh_download_is_hashed_as_it_arrives(tmp_path: Path, hashed_bytes: list[int]) -> None:
    blob = os.urandom(2 * CHUNK_SIZE + 7)
    sha = hashlib.new("sha256", blob).hexdigest()
    path, moved = BlobCache(tmp_path / "cache").fetch(_FakeDownloads(blob), [], sha, len(blob), "base",  # type: ignore[arg-type]
                                                       progress=False)
    assert moved == len(blob) and path.read_bytes() == blob and hashed_bytes[0] == len(blob)


def test_resumed_download_with_a_wrong_prefix_is_discarded(tmp_path: Path) -> None:
    blob = os.urandom(2 * CHUNK_SIZE)
    sha = hashlib.sha256(blob).hexdigest()
    cache = BlobCache(tmp_path / "cache")
    part = cache.path(sha).with_suffix(".part")
    part.write_bytes(b"x" + blob[1:CHUNK_SIZE])  # right length, one wrong byte
    with pytest.raises(InvalidInput, match="does not match its sha256"):
        cache.fetch(_FakeDownloads(blob), [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    assert not part.exists() and not cache.has(sha)
    # A complete but wrong .part (nothing left to download) is checked too.
    part.write_bytes(b"y" * len(blob))
    with pytest.raises(InvalidInput, match="does not match its sha256"):
        cache.fetch(_FakeDownloads(blob), [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    assert not part.exists()


def test_out_of_order_or_overlong_streams_are_refused(tmp_path: Path) -> None:
    blob = os.urandom(3 * CHUNK_SIZE)
    sha = hashlib.sha256(blob).hexdigest()
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(InvalidInput, match="expected"):
        cache.fetch(_FakeDownloads(blob, skip=True), [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    # What came in order before the bad chunk is kept and resumed from.
    assert cache.path(sha).with_suffix(".part").stat().st_size == CHUNK_SIZE
    cache.path(sha).with_suffix(".part").unlink()
    with pytest.raises(InvalidInput, match="longer than"):
        cache.fetch(_FakeDownloads(blob, extra=b"!"), [], sha, len(blob), "base", progress=False)  # type: ignore[arg-type]
    assert not cache.has(sha)
