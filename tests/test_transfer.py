"""Client-side transfers against a real coordinator: resumable, verified downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedtune.client.transfer import BlobCache, materialize
from fedtune.errors import InvalidInput
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
