"""The committed stubs are exactly what protoc makes from protos/ (CI fails when they drift)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.protos.generate import OUT_DIR, generate


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the test extra")
    written = generate(tmp_path)
    assert written, "protoc produced nothing"
    for fresh in written:
        committed = OUT_DIR / fresh.name
        assert committed.exists(), f"{committed.name} is not committed: run python -m fedtune.protos.generate"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} drifted from protos/: run python -m fedtune.protos.generate and commit"
        )
