"""SQLite state and the content-addressed store: durability rules and invariants."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from fedtune.coordinator.state import CoordinatorState, FileEntry, Update
from fedtune.coordinator.store import ArtifactStore
from fedtune.errors import AuthError, NotFound, PreconditionFailed, StateConflict


def _state(tmp_path: Path) -> tuple[CoordinatorState, str]:
    st = CoordinatorState(tmp_path / "state.db")
    job = st.add_job(name="j", spec_json="{}", base_model="b", base_hash="h", files=[FileEntry("config.json", "a" * 64, 3)],
                     initial_adapter="c" * 64, peft_config_json="{}")
    return st, job.job_id


def _update(job: str, client: str, uid: str, rnd: int = 1) -> Update:
    return Update(update_id=uid, job_id=job, round=rnd, client_id=client, task_id="t", sha256="d" * 64, size=1,
                  num_examples=1, metrics={}, codec="fp32", received=time.time())


def test_updates_are_idempotent_and_only_for_open_rounds(tmp_path: Path) -> None:
    st, job = _state(tmp_path)
    with pytest.raises(PreconditionFailed):
        st.add_update(_update(job, "c1", "u1"))  # no round open yet
    st.open_round(job, 1, ["c1", "c2"], "c" * 64, time.time() + 60)
    assert st.add_update(_update(job, "c1", "u1")) is True
    assert st.add_update(_update(job, "c1", "u1")) is False
    with pytest.raises(PreconditionFailed, match="already submitted"):
        st.add_update(_update(job, "c1", "u2"))
    with pytest.raises(PreconditionFailed, match="another update"):
        st.add_update(_update(job, "c2", "u1"))
    st.set_round_state(job, 1, "closing")
    with pytest.raises(PreconditionFailed, match="not open"):
        st.add_update(_update(job, "c2", "u3"))
    assert [u.update_id for u in st.updates(job, 1)] == ["u1"]


def test_state_survives_reopening(tmp_path: Path) -> None:
    st, job = _state(tmp_path)
    st.open_round(job, 1, ["c1"], "c" * 64, time.time() + 60)
    st.add_update(_update(job, "c1", "u1"))
    st.close()
    again = CoordinatorState(tmp_path / "state.db")
    assert [u.update_id for u in again.updates(job, 1)] == ["u1"]
    assert again.round(job, 1).cohort == ("c1",)


def _keys() -> tuple[bytes, bytes]:
    return os.urandom(32), os.urandom(32)


def test_tokens_are_hashed_scoped_counted_revocable_and_expire(tmp_path: Path) -> None:
    st, job = _state(tmp_path)
    token, _, token_id = st.add_token(job, uses=2, ttl_seconds=60)
    raw = sqlite3.connect(tmp_path / "state.db").execute("SELECT token_hash FROM tokens").fetchall()
    assert all(token not in row[0] for row in raw)
    c1 = st.join(token, "a", "cpu", *_keys())
    st.join(token, "b", "cpu", *_keys())
    with pytest.raises(AuthError, match="no uses left"):
        st.join(token, "c", "cpu", *_keys())
    assert st.client(c1.client_id).job_id == job
    with pytest.raises(AuthError):
        st.client("client-forged")
    # Revoking the token locks out the clients enrolled with it.
    assert st.revoke_token(token_id) == (token_id, 2)
    with pytest.raises(AuthError, match="revoked"):
        st.client(c1.client_id)
    short, _, _ = st.add_token(job, uses=1, ttl_seconds=0.01)
    time.sleep(0.05)
    with pytest.raises(AuthError, match="expired"):
        st.join(short, "d", "cpu", *_keys())
    with pytest.raises(NotFound):
        st.add_token("job-missing", 1, 60)
    with pytest.raises(NotFound):
        st.revoke_token("nope")


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("CREATE TABLE something (x)")
    with pytest.raises(StateConflict, match="not a fedtune coordinator"):
        CoordinatorState(tmp_path / "state.db")


def test_store_is_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "blobs")
    data = b"x" * (3 << 20)
    sha = store.put_bytes(data)
    assert store.put_bytes(data) == sha and store.read(sha) == data and store.size(sha) == len(data)
    chunks = list(store.iter_chunks(sha, offset=100))
    assert b"".join(chunks) == data[100:] and max(len(c) for c in chunks) == 1 << 20
    assert not list((tmp_path / "blobs").rglob(".tmp-*"))
    with pytest.raises(NotFound):
        store.read("0" * 64)
    with pytest.raises(NotFound):
        store.read("../../etc/passwd")


def test_store_streams_files_in(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "blobs")
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(3 << 20))
    sha = store.put_file(src)
    assert store.read(sha) == src.read_bytes()
    assert store.put_file(src) == sha
    assert not list((tmp_path / "blobs").glob(".tmp-*"))
