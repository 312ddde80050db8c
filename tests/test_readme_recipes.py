"""The README's shell recipes run as written.

Every ```bash block in README.md is preceded by a marker comment:

    <!-- readme-test: run SCENARIO/STEP ... -->   run here, in order with the scenario's other steps
    <!-- readme-test: skip (why) ... -->          not run (installs packages, needs a GPU, takes minutes)

Blocks that run are read from the README at test time, so a renamed or missing flag in a recipe
fails here. Every `fedtune ...` command in any block, run or skipped, and in the CLI reference
table must also name only options that command has.

The "machines" scenario is "Running it on separate machines", on loopback: each machine is a
directory (the operator's, the data owner's), and only what a reader would change is changed:
coordinator.example.org -> localhost, /srv/fedtune -> a temp dir, port 50051 -> a free port, TOKEN
-> what `token create` printed, and the `job.yaml` edit the recipe asks for (1 round of 1 client).
`fedtune coordinator start` runs in the background until the scenario ends.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from fedtune.data import write_synthetic_federation
from tests.conftest import REPO

README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(run|skip)\b(.*?)-->", re.DOTALL)
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    """One fenced code block of the README."""

    lang: str
    line: int  # of its first code line, 1-based
    code: str
    action: str | None = None  # run / skip, from the marker before it
    step: str = ""  # SCENARIO/STEP for run blocks


def readme_blocks(text: str) -> list[Block]:
    """The README's fenced blocks, each with the readme-test marker that precedes it (if any)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        block = Block(m.group(1), start + 2, "\n".join(lines[start + 1:i]))
        before = "\n".join(lines[:start]).rstrip()
        marker = list(MARKER.finditer(before))
        if marker and before.endswith(marker[-1].group(0)):
            block.action = marker[-1].group(1)
            if block.action == "run":
                block.step = marker[-1].group(2).split()[0].rstrip(".")
        blocks.append(block)
        i += 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.lang in ("bash", "sh", "shell", "console")]


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(README line, command) with backslash continuations joined; blank and comment lines dropped."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for n, raw in enumerate(block.code.splitlines(), start=block.line):
        if not pending:
            first = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append((first, line))
    return out


# ---------------------------------------------------------------------------------- flags exist

def _fedtune_invocations(command: str) -> list[list[str]]:
    """The argument lists of each `fedtune ...` in a shell command (pipelines, &&, $(...) included)."""
    found = []
    for part in re.split(r"&&|\|\||[|;]|\$\(|\)", command):
        part = re.split(r"\s#|\s[12]?>", " " + part, maxsplit=1)[0].strip()
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        if words and re.fullmatch(r"(\S*/)?fedtune", words[0]):
            found.append(words[1:])
    return found


def _unknown_options(args: list[str]) -> list[str]:
    from fedtune.cli.main import app

    # Duck-typed: typer >= 0.22 vendors its own click.
    command: Any = typer.main.get_command(app)
    path = ["fedtune"]
    rest = list(args)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    if hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        return [f"{' '.join(path)} has no command {rest[0]!r}"]
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    return [f"{' '.join(path)} has no option {word.split('=')[0]}" for word in rest
            if word.startswith("-") and word.split("=")[0] not in known and not re.fullmatch(r"-\d.*", word)]


def test_every_shell_block_is_marked() -> None:
    blocks = shell_blocks()
    assert blocks, "no shell blocks found in README.md"
    unmarked = [b.line for b in blocks if b.action is None]
    assert not unmarked, (f"README.md shell blocks at lines {unmarked} need a marker before them: "
                          "<!-- readme-test: run SCENARIO/STEP --> or <!-- readme-test: skip (why) -->")
    steps = [b.step for b in blocks if b.action == "run"]
    assert steps == list(MACHINES_STEPS), f"the recipe's run blocks are {steps}, the test knows {MACHINES_STEPS}"


def test_every_readme_command_names_options_that_exist() -> None:
    problems = []
    for block in shell_blocks():
        for line, command in logical_lines(block):
            for args in _fedtune_invocations(command):
                problems += [f"README.md:{line}: {p}" for p in _unknown_options(args)]
    # The CLI reference table: `fedtune ...` in its first column.
    for n, row in enumerate(README.read_text().splitlines(), start=1):
        m = re.match(r"\| `(fedtune [^`]*)` \|", row)
        if not m:
            continue
        words = m.group(1).replace("\\|", " ").split()
        sub = [w for w in words[1:] if re.fullmatch(r"[a-z][a-z-]*", w)]
        options = [o for o in re.findall(r"--[a-z][a-z0-9-]*", m.group(1))]
        problems += [f"README.md:{n}: {p}" for p in _unknown_options(sub[:2] + options)]
    assert not problems, "\n".join(problems)


def test_the_option_check_catches_a_renamed_flag() -> None:
    assert _unknown_options(["adapters", "verify", "DIR", "--public-key", "K"]) == []
    assert _unknown_options(["adapters", "verify", "DIR", "--pubkey", "K"]) == ["fedtune adapters verify has no option --pubkey"]
    assert _unknown_options(["coordinator", "stop"]) == ["fedtune coordinator has no command 'stop'"]


# ---------------------------------------------------------------------------------- running them

MACHINES_STEPS = ("machines/certs", "machines/operator", "machines/data-owner", "machines/consumer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Machine:
    """One machine of a recipe: its directory (cwd and HOME) and its shell's variables."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)


class Recipe:
    """Runs README blocks line by line, as a reader would type them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.port = _free_port()
        self.subs = {"coordinator.example.org": "localhost", "/srv/fedtune": str(tmp_path / "operator/srv/fedtune"),
                     "50051": str(self.port)}
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.captured: dict[str, str] = {}
        self.transcript: list[str] = []
        self.started = time.time()

    def machine(self, name: str) -> Machine:
        root = self.tmp / name
        root.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("FEDTUNE_", "GRPC_"))}
        path = f"{Path(sys.executable).parent}{os.pathsep}{keep.get('PATH', '')}"
        # The recipe installs plain `fedtune`, without the [ray] extra: hide the test venv's Ray
        # (its local cluster would also take most of this test's time to start).
        no_ray = self.tmp / "no-ray"
        no_ray.mkdir(exist_ok=True)
        (no_ray / "ray.py").write_text("raise ImportError('ray is not installed on this machine')\n")
        pythonpath = os.pathsep.join(p for p in (str(no_ray), keep.get("PYTHONPATH", "")) if p)
        return Machine(root, {**keep, "PATH": path, "PYTHONPATH": pythonpath, "HOME": str(root),
                              "OMP_NUM_THREADS": "1"})

    def substitute(self, command: str) -> str:
        for old, new in self.subs.items():
            command = command.replace(old, new)
        for name, value in self.captured.items():
            command = re.sub(rf"\b{name}\b(?!=)", value, command) if name.isupper() else command
        return command

    def run(self, block: Block, machine: Machine, *, after: dict[str, object] | None = None) -> None:
        """Runs each command of ``block`` on ``machine``; ``after``: {text in a command: hook} runs
        the hook (the reader's manual step) after that command."""
        for line, raw in logical_lines(block):
            command = self.substitute(raw)
            self.transcript.append(f"[{machine.root.name}] README.md:{line}: {command}")
            export = re.fullmatch(r"export\s+(.*)", command)
            capture = re.fullmatch(r"(\w+)=\$\((.*)\)\s*(#.*)?", command)
            if export:
                for assignment in shlex.split(export.group(1).split(" #")[0]):
                    key, _, value = assignment.partition("=")
                    machine.env[key] = value
            elif re.match(r"(\S*/)?fedtune coordinator start\b", command):
                self._start_in_background(command, machine, line)
            else:
                out = self._run(capture.group(2) if capture else command, machine, line)
                if capture:
                    machine.env[capture.group(1)] = out.strip()
                if "token create" in command:
                    self.captured["TOKEN"] = out.strip().splitlines()[-1]
            self.transcript[-1] += f"  ({time.time() - self.started:.1f} s)"
            for text, hook in (after or {}).items():
                if text in raw:
                    hook(machine)  # type: ignore[operator]

    def _run(self, command: str, machine: Machine, line: int) -> str:
        proc = subprocess.run(["bash", "-c", command], check=False, cwd=machine.root, env=machine.env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (
            f"README.md:{line} exited {proc.returncode}: {command}\nstdout: {proc.stdout[-2000:]}\n"
            f"stderr: {proc.stderr[-3000:]}\nso far:\n" + "\n".join(self.transcript) + f"\n{self.logs()}")
        return proc.stdout

    def _start_in_background(self, command: str, machine: Machine, line: int) -> None:
        log = machine.root / f"background-{len(self.background)}.log"
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=machine.root, env=machine.env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((proc, log))
        deadline = time.time() + 120
        while "fedtune coordinator listening on" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"README.md:{line} exited {proc.returncode}: {command}\n{log.read_text()}"
            assert time.time() < deadline, f"README.md:{line}: no coordinator after 120 s\n{log.read_text()}"
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {log}:\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.background)

    def stop(self) -> None:
        for proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.background:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _edit_job_spec(machine: Machine) -> None:
    """The recipe's "edit:" step: a job one client finishes in one short round."""
    path = machine.root / "job.yaml"
    spec = yaml.safe_load(path.read_text())
    spec.update(rounds=1, clients_per_round=1, min_clients=1, cohort_wait_seconds=0)
    spec["training"] = {**spec["training"], "steps": 3, "max_seq_len": 48}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.mark.integration
def test_separate_machines_recipe_runs_as_written(tmp_path: Path) -> None:
    blocks = {b.step: b for b in shell_blocks() if b.action == "run"}
    recipe = Recipe(tmp_path)
    operator, alice = recipe.machine("operator"), recipe.machine("alice")
    try:
        recipe.run(blocks["machines/certs"], operator)
        recipe.run(blocks["machines/operator"], operator, after={"job init": _edit_job_spec})
        # What the operator hands the data owner, and the data owner's own private file.
        for name in ("ca.pem", "alice.pem", "alice.key"):
            shutil.copy(operator.root / "pki" / name, alice.root / name)
        files, _ = write_synthetic_federation(tmp_path / "data", 1, examples_per_client=24, eval_examples=8)
        shutil.copy(files[0], alice.root / "private.jsonl")
        recipe.run(blocks["machines/data-owner"], alice)
        recipe.run(blocks["machines/consumer"], operator)
    finally:
        recipe.stop()
    adapter = operator.root / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "fedtune.json").is_file()
    assert (alice.root / ".fedtune" / "client" / "identity.json").is_file()
