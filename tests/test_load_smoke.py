"""Many clients against one coordinator process: the load generator of benchmarks/load_clients.py, small."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import load_generator


@pytest.mark.integration
def test_200_signed_clients_heartbeat_for_10_seconds_without_an_error(tmp_path: Path) -> None:
    load = load_generator()
    coord = load.CoordinatorProcess(tmp_path / "coord", tmp_path / "coordinator.log")
    try:
        rows = asyncio.run(load.idle_steps(coord, [200], seconds=10.0, long_poll=0.0, warmup=1.0))
    finally:
        coord.stop()
    row = rows[0]
    assert row["errors"] == 0, row["error_codes"]
    # Every client is connected as the admin API (`fedtune job status`) reports it.
    assert row["enrolled"] == 200 and row["connected"] == 200
    # Each client heartbeated through the window (about one a second; generous for a busy machine).
    assert row["heartbeats"] >= 200 * 10 * 0.5
