"""`fedtune simulate`'s worker pool: its sizing and queue, and long-lived workers on a real Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedtune.errors import InvalidInput
from fedtune.simulation.schedule import ClientResources, CohortQueue, pool_size
from tests.conftest import fedtune_cmd


def test_pool_size_follows_the_cluster_and_the_cohort() -> None:
    default = ClientResources()  # cpus=0.25
    assert pool_size(2, 0, default, max_in_flight=10) == 8
    assert pool_size(2, 0, default, max_in_flight=3) == 3  # never more than can be busy at once
    assert pool_size(2, 0, ClientResources(cpus=1), max_in_flight=100) == 2
    assert pool_size(2, 0, ClientResources(cpus=0.1), max_in_flight=100) == 20  # 2 / 0.1 is 19.99... in floats
    assert pool_size(16, 2, ClientResources(cpus=1, gpus=0.5), max_in_flight=100) == 4  # the GPUs bind
    assert pool_size(2, 0, ClientResources(cpus=0), max_in_flight=7) == 7
    assert pool_size(2, 0, default, max_in_flight=10, workers=2) == 2
    assert pool_size(2, 0, default, max_in_flight=3, workers=50) == 3
    with pytest.raises(InvalidInput, match="asks 1 GPUs per worker; the Ray cluster has 0"):
        pool_size(8, 0, ClientResources(cpus=1, gpus=1), max_in_flight=4)
    with pytest.raises(InvalidInput, match="asks 4 CPUs"):
        pool_size(2, 0, ClientResources(cpus=4), max_in_flight=4)


def test_the_queue_hands_groups_to_free_workers_in_order() -> None:
    q = CohortQueue(workers=2, batch_clients=2)
    q.enqueue(["a", "b", "c", "d", "e"])
    q.enqueue(["a", "f"])  # a is already waiting: not queued twice
    assert q.dispatch() == [(0, ["a", "b"]), (1, ["c", "d"])]
    assert q.dispatch() == []  # no worker free
    assert q.busy() == {"a", "b", "c", "d", "e", "f"}
    q.enqueue(["c"])  # c is running: not queued again
    assert q.waiting() == 2
    assert q.finished(1) == ["c", "d"]
    assert q.dispatch() == [(1, ["e", "f"])]
    assert q.finished(0) == ["a", "b"]
    assert q.dispatch() == []
    assert q.running() == {1: ["e", "f"]}
    assert q.busy() == {"e", "f"}
    # Workers join as they finish warming up; one that died is not taken back.
    later = CohortQueue()
    later.enqueue(["x", "y"])
    assert later.dispatch() == []
    later.add_worker(3)
    assert later.dispatch() == [(3, ["x"])]
    assert later.finished(3, free=False) == ["x"]
    assert later.dispatch() == []
    later.add_worker(3)
    assert later.dispatch() == [(3, ["y"])]


def test_a_client_goes_back_to_the_worker_that_ran_it() -> None:
    q = CohortQueue(workers=3)
    q.enqueue(["a", "b", "c", "d"])
    assert q.dispatch() == [(0, ["a"]), (1, ["b"]), (2, ["c"])]
    q.finished(1)
    assert q.dispatch() == [(1, ["d"])]
    for w in (0, 1, 2):
        q.finished(w)
    # The next round queues them in another order: each free worker takes what it ran before first
    # (worker 1 ran b and d), then whoever waited longest.
    q.enqueue(["d", "c", "b", "a", "e"])
    assert q.dispatch() == [(0, ["a"]), (1, ["b"]), (2, ["c"])]
    q.finished(2)
    assert q.dispatch() == [(2, ["d"])]  # no client of worker 2 waits: the longest waiting
    q.finished(1)
    assert q.dispatch() == [(1, ["e"])]  # d ran on worker 2 since
    batched = CohortQueue(workers=2, batch_clients=2)
    batched.enqueue(["a", "b", "c", "d"])
    assert batched.dispatch() == [(0, ["a", "b"]), (1, ["c", "d"])]
    batched.finished(0), batched.finished(1)
    batched.enqueue(["c", "a", "x", "d", "b"])
    assert batched.dispatch() == [(0, ["a", "b"]), (1, ["c", "d"])]  # not the queue order (c, a; x, d)
    assert batched.waiting() == 1


def test_prepared_data_is_kept_per_client_within_a_token_budget() -> None:
    from types import SimpleNamespace

    from fedtune.simulation.shared_model import PreparedCache

    def prepared(tokens: int, base: str = "h1") -> SimpleNamespace:
        return SimpleNamespace(base_hash=base, tokenized=[{"input_ids": [1] * tokens, "labels": [1] * tokens}])

    cache = PreparedCache(max_tokens=10)
    a, b, c = prepared(4), prepared(4), prepared(4)
    cache.put("/s/a", a)
    cache.put("/s/b", b)
    assert cache.get("/s/a", "h1") is a  # a is now the most recently used
    assert cache.get("/s/a", "h2") is None  # prepared for another base: not this task's
    cache.put("/s/c", c)  # 12 tokens: the least recently used (b) goes
    assert cache.get("/s/b", "h1") is None
    assert cache.get("/s/a", "h1") is a and cache.get("/s/c", "h1") is c
    cache.put("/s/big", prepared(11))  # more than the whole budget: not kept
    assert cache.get("/s/big", "h1") is None and len(cache) == 2


@pytest.mark.integration
def test_workers_outlive_rounds_and_the_output_names_the_adapter(tmp_path: Path) -> None:
    # 4 virtual clients, 2 per round, 3 rounds, at the default 0.25 CPUs: a pool of 2 workers runs
    # the 6 client-rounds, each worker loading the model once, and the output ends with the adapter.
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: sim\nbase_model: tiny-llama\npeft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n"
        "training: {steps: 2, lr: 0.005, batch_size: 8, max_seq_len: 48}\nrounds: 3\nclients_per_round: 2\n"
        "min_clients: 2\nround_deadline_seconds: 300\ncohort_wait_seconds: 0\n")
    out = tmp_path / "sim"
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "4", "--out", str(out), timeout=600,
                       env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+/\d+\s", line)]
    assert [r.split()[:2] for r in rows] == [["1", "2/2"], ["2", "2/2"], ["3", "2/2"]]

    ran = json.loads((out / "simulation.json").read_text())
    assert ran["workers"] == 2
    runs = ran["runs"]
    assert sum(len(r["clients"]) for r in runs) == 6  # 2 clients x 3 rounds, each in its own run
    pids = {r["pid"] for r in runs}
    assert 1 <= len(pids) <= ran["workers"] < 6
    # One model per worker process, whichever virtual clients it ran.
    assert all(r["model_builds"] == 1 for r in runs), runs
    assert f"workers: 6 virtual-client runs in {len(pids)} worker processes (pool of 2)" in proc.stdout

    # The output ends by naming the last published adapter, which peft can load as is.
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("published adapter: ")]
    adapter = Path(line.removeprefix("published adapter: "))
    assert adapter == next((out / "coordinator" / "adapters").glob("*/round-3")).resolve()
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert "PeftModel.from_pretrained" in proc.stdout and "fedtune adapters pull" in proc.stdout
    # No line per virtual client joining or training: the table is the output.
    assert "joined job" not in proc.stderr and "round 1: task" not in proc.stderr


def test_workers_below_one_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("rounds: 1\n")
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "2", "--workers", "0")
    assert proc.returncode == 2 and "--workers" in proc.stderr
