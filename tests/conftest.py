"""Shared fixtures: real coordinators on 127.0.0.1 ports picked at run time, real SQLite, real peft."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.data import write_synthetic_federation
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]

# Small and quick: one client per round unless a test says otherwise.
FAST_SPEC = """\
name: test
base_model: tiny-llama
peft: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
training: {{steps: {steps}, lr: 0.01, batch_size: 8, max_seq_len: 48}}
rounds: {rounds}
clients_per_round: {clients}
min_clients: {min_clients}
round_deadline_seconds: {deadline}
cohort_wait_seconds: {cohort_wait}
eval_data: {eval_data}
"""


def make_spec(eval_data: Path | None = None, *, steps: int = 5, rounds: int = 1, clients: int = 1,
              min_clients: int | None = None, deadline: float = 120, cohort_wait: float = 0) -> str:
    """A job spec for tests."""
    return FAST_SPEC.format(steps=steps, rounds=rounds, clients=clients, min_clients=min_clients or clients,
                            deadline=deadline, cohort_wait=cohort_wait,
                            eval_data=json.dumps(str(eval_data)) if eval_data else "null")


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Synthetic non-IID data for 4 clients and a held-out eval file."""
    return write_synthetic_federation(tmp_path_factory.mktemp("data"), 4, examples_per_client=32, eval_examples=32)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """An in-process coordinator on a free loopback port."""
    running = start(tmp_path / "coord", "127.0.0.1", 0, insecure=True)
    yield running
    running.stop(grace=0.5)


class Admin:
    """Admin API with the coordinator's token."""

    def __init__(self, running: RunningCoordinator) -> None:
        self.channel = grpc.insecure_channel(running.address)
        self.stub = pb_grpc.AdminServiceStub(self.channel)
        token = (running.coordinator.state_dir / "admin.token").read_text().strip()
        self.md = [("x-fedtune-admin", token)]

    def create_job(self, spec: str) -> str:
        return self.stub.CreateJob(pb.CreateJobRequest(spec_yaml=spec), metadata=self.md).job_id

    def token(self, job_id: str, uses: int = 1, ttl: int = 3600) -> str:
        return self.stub.CreateToken(pb.CreateTokenRequest(job_id=job_id, uses=uses, ttl_seconds=ttl),
                                     metadata=self.md).token

    def job(self, job_id: str) -> pb.JobStatus:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.md)


@pytest.fixture
def admin(coordinator: RunningCoordinator) -> Iterator[Admin]:
    a = Admin(coordinator)
    yield a
    a.channel.close()


def load_generator() -> ModuleType:
    """benchmarks/load_clients.py as a module: many signed clients of the real protocol."""
    spec = importlib.util.spec_from_file_location("load_clients", REPO / "benchmarks" / "load_clients.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Polls ``pred`` until it returns a truthy value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fedtune_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
                check: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs the `fedtune` CLI in a separate process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedtune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def spawn(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Starts the `fedtune` CLI as a background process writing to ``log``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=full_env, cwd=REPO)


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op torch thread for tiny models: several threads on a busy 2-core machine spin
    waiting for each other and run many times slower (one is also the fastest when idle)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_training_setup(tmp_path_factory: pytest.TempPathFactory, n_clients: int, max_seq_len: int):  # type: ignore[no-untyped-def]
    """(preset dir, pad id, tokenized train examples of all clients, tokenized held-out examples)."""
    from fedtune.data import load_jsonl, tokenize
    from fedtune.models import TINY_PRESET, load_tokenizer, materialize_preset

    preset = materialize_preset(TINY_PRESET, tmp_path_factory.mktemp("preset"))
    tokenizer = load_tokenizer(preset)
    clients, eval_path = write_synthetic_federation(tmp_path_factory.mktemp("data"), n_clients=n_clients)
    train = [item for path in clients for item in tokenize(load_jsonl(path), tokenizer, max_seq_len=max_seq_len)]
    held_out = tokenize(load_jsonl(eval_path), tokenizer, max_seq_len=max_seq_len)
    return preset, tokenizer.pad_token_id, train, held_out


def run_agents(coordinator: RunningCoordinator, admin: Admin, job: str, data: list[Path], tmp_path: Path,
               timeout: float = 240, extra: list[list[str]] | None = None) -> None:
    """Runs one plaintext client agent process per data file against an in-process coordinator
    until the job ends; fails with an agent's log when one exits non-zero. ``extra``: each
    agent's own further arguments."""
    agents = [spawn("client", "run", "--coordinator", coordinator.address, "--token", admin.token(job),
                    "--data", str(path), "--state-dir", str(tmp_path / f"c{i}"), "--no-progress", "--insecure",
                    *(extra[i] if extra else []), log=tmp_path / f"c{i}.log") for i, path in enumerate(data)]
    try:
        for i, a in enumerate(agents):
            assert a.wait(timeout=timeout) == 0, (tmp_path / f"c{i}.log").read_text()[-3000:]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()


def llama_base(root: Path, **config: object) -> Path:
    """A random Llama with the tiny preset's tokenizer, saved under ``root/model`` (``config``:
    LlamaConfig fields: sizes, blocks)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models import load_tokenizer, materialize_preset

    tok = load_tokenizer(materialize_preset("tiny-llama", root / "tiny"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      **config)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def base6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block Llama with the tiny preset's tokenizer: enough blocks to drop some."""
    return llama_base(tmp_path_factory.mktemp("base6"), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      tie_word_embeddings=False)
