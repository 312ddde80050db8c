"""`fedtune demo`, the README's first command, works and says what it promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import fedtune_cmd

pytestmark = pytest.mark.integration


def test_demo_runs_rounds_and_publishes_a_better_adapter(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = fedtune_cmd("demo", "--clients", "2", "--rounds", "2", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+/\d+\s", line)]
    assert [int(r.split()[0]) for r in rows] == [1, 2]
    assert all(r.split()[1] == "2/2" for r in rows)
    match = re.search(r"base (\d+\.\d+) -> published adapter (\d+\.\d+)", proc.stdout)
    assert match and float(match.group(2)) < float(match.group(1))
    adapter = Path(re.search(r"published adapter: (\S+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert adapter.is_relative_to(out)
    assert json.loads((adapter / "fedtune.json").read_text())["round"] == 2
    assert (out / "logs" / "coordinator.log").exists() and (out / "logs" / "client-1.log").exists()
    # Each client got its own private data.
    files = sorted((out / "data").glob("client_*.jsonl"))
    assert len(files) == 2 and files[0].read_text() != files[1].read_text()


def test_secure_demo_publishes_under_secure_aggregation(tmp_path: Path) -> None:
    proc = fedtune_cmd("demo", "--clients", "3", "--rounds", "1", "--secure", "--out", str(tmp_path / "d"), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "SecAgg+" in proc.stdout
    assert re.search(r"^\s+1\s+3/3\s", proc.stdout, re.MULTILINE)
