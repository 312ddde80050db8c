"""`fedtune demo`, the README's first command, works and says what it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fedtune_cmd

pytestmark = pytest.mark.integration


@pytest.mark.slow
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
    # The lines it prints to load the adapter load it with plain peft.
    hint = proc.stdout.split("load it with plain peft:\n", 1)[1].splitlines()[:3]
    code = "\n".join(line.strip() for line in hint) + "\nprint(type(model).__name__)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "PeftModelForCausalLM", loaded.stderr[-2000:]


@pytest.mark.slow
def test_secure_demo_without_out_keeps_its_adapter_in_the_working_dir(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedtune", "demo", "--clients", "3", "--rounds", "1", "--secure"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "SecAgg+" in proc.stdout
    assert re.search(r"^\s+1\s+3/3\s", proc.stdout, re.MULTILINE)
    adapter = Path(re.search(r"published adapter: (\S+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert adapter.is_relative_to(tmp_path / "fedtune-demo") and (adapter / "adapter_model.safetensors").is_file()
    assert f"kept in {tmp_path / 'fedtune-demo'}" in proc.stdout


def test_demos_without_out_do_not_overwrite_each_other(tmp_path: Path) -> None:
    from fedtune.demo import default_out_dir

    assert default_out_dir(tmp_path) == tmp_path / "fedtune-demo"
    (tmp_path / "fedtune-demo").mkdir()
    (tmp_path / "fedtune-demo-2").mkdir()
    assert default_out_dir(tmp_path) == tmp_path / "fedtune-demo-3"
