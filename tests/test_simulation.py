"""`fedtune simulate`: partitions, and a 100-client federation on a real local Ray."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedtune.data import write_synthetic_federation
from fedtune.errors import ExitCode, InvalidInput
from fedtune.simulation.partition import partition
from fedtune.simulation.runner import ClientResources
from tests.conftest import fedtune_cmd


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files, _ = write_synthetic_federation(tmp_path_factory.mktemp("pool"), 5, examples_per_client=40)
    out = files[0].parent / "all.jsonl"
    out.write_text("".join(f.read_text() for f in files))
    return out


def test_iid_partition_is_even_and_complete(pool: Path) -> None:
    shares = partition(pool, 7, "iid")
    assert sum(len(s) for s in shares) == 200
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


def test_dirichlet_partition_skews_tasks(pool: Path) -> None:
    def task_mix(shares):  # type: ignore[no-untyped-def]
        return [Counter(r["prompt"].split()[0] for r in s).most_common(1)[0][1] / len(s) for s in shares]

    skewed = task_mix(partition(pool, 5, "dirichlet:0.1", seed=1))
    even = task_mix(partition(pool, 5, "iid", seed=1))
    assert sum(skewed) / 5 > sum(even) / 5 + 0.2
    assert all(len(s) > 0 for s in partition(pool, 50, "dirichlet:0.05"))


def test_by_key_partition_and_bad_requests(pool: Path, tmp_path: Path) -> None:
    keyed = tmp_path / "keyed.jsonl"
    keyed.write_text("".join(json.dumps({"prompt": f"q{i % 6}", "response": "a"}) + "\n" for i in range(12)))
    shares = partition(keyed, 3, "by-key:prompt")
    assert [len(s) for s in shares] == [4, 4, 4]
    with pytest.raises(InvalidInput, match="fewer than the 7 clients"):
        partition(keyed, 7, "by-key:prompt")
    with pytest.raises(InvalidInput, match="only 200 examples"):
        partition(pool, 201, "iid")
    with pytest.raises(InvalidInput, match="unknown partition"):
        partition(pool, 3, "zipf")
    with pytest.raises(InvalidInput, match="ALPHA must be positive"):
        partition(pool, 3, "dirichlet:0")
    assert ClientResources.parse("cpus=0.5,gpus=0") == ClientResources(0.5, 0.0)
    with pytest.raises(InvalidInput, match="unknown resource"):
        ClientResources.parse("tpus=1")


@pytest.mark.integration
@pytest.mark.slow
def test_a_100_client_simulation_completes_on_ray(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: sim\nbase_model: tiny-llama\npeft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj, lm_head]}\n"
        "training: {steps: 4, lr: 0.005, batch_size: 8, max_seq_len: 48}\nrounds: 2\nclients_per_round: 8\n"
        "min_clients: 8\nround_deadline_seconds: 300\ncohort_wait_seconds: 0\n")
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "100", "--partition", "dirichlet:0.5",
                       "--out", str(tmp_path / "sim"), timeout=600,
                       env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+/\d+\s", line)]
    assert [r.split()[:2] for r in rows] == [["1", "8/8"], ["2", "8/8"]]
    adapters = list((tmp_path / "sim" / "coordinator" / "adapters").glob("*/round-2/adapter_model.safetensors"))
    assert len(adapters) == 1
    # Only cohort members ever ran: the other virtual clients never downloaded anything.
    ran = [d for d in (tmp_path / "sim" / "clients").iterdir() if any((d / "cache").glob("*"))]
    assert 8 <= len(ran) <= 16


def test_too_many_clients_for_the_data_is_named(tmp_path: Path, pool: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("rounds: 1\n")
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "500", "--data", str(pool))
    assert proc.returncode == ExitCode.BAD_INPUT and "only 200 examples" in proc.stderr


def _sim_spec(tmp_path: Path, clients: int) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: sim\nbase_model: tiny-llama\npeft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj, lm_head]}\n"
        f"training: {{steps: 4, lr: 0.005, batch_size: 8, max_seq_len: 48}}\nrounds: 2\nclients_per_round: {clients}\n"
        f"min_clients: {clients}\nround_deadline_seconds: 300\ncohort_wait_seconds: 0\n")
    return spec


@pytest.mark.integration
@pytest.mark.slow
def test_batched_virtual_clients_publish_what_one_client_per_task_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = _sim_spec(tmp_path, 6)
    published = {}
    for k in (1, 3):
        proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "6", "--batch-clients", str(k),
                           "--client-resources", "cpus=1", "--out", str(tmp_path / f"sim{k}"), timeout=600,
                           env={"RAY_USAGE_STATS_ENABLED": "0"})
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+/\d+\s", line)]
        assert [r.split()[:2] for r in rows] == [["1", "6/6"], ["2", "6/6"]]
        (path,) = (tmp_path / f"sim{k}" / "coordinator" / "adapters").glob("*/round-2/adapter_model.safetensors")
        published[k] = load_file(str(path))
        if k == 3:
            # Two groups of three per round, each trained in one shared pass of the base.
            assert "batched training: 4 shared passes trained 12 client updates (up to 3 per pass)" in proc.stdout
        else:
            assert "batched training" not in proc.stdout
    # Same clients, data, seeds and rounds: the same published adapter, to float rounding.
    assert published[1].keys() == published[3].keys()
    for key, value in published[1].items():
        assert torch.allclose(published[3][key], value, rtol=1e-4, atol=1e-6), key
    assert any(v.abs().max() > 0 for k, v in published[1].items() if "lora_B" in k)


def test_batch_clients_below_one_is_refused(tmp_path: Path) -> None:
    proc = fedtune_cmd("simulate", "--config", str(_sim_spec(tmp_path, 2)), "--clients", "2", "--batch-clients", "0")
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "--batch-clients must be at least 1, got 0" in proc.stderr


@pytest.mark.integration
def test_a_simulation_of_another_peft_method_and_batching_that_falls_back(tmp_path: Path) -> None:
    # LoHa cannot share batched LoRA passes: with --batch-clients its virtual clients train alone
    # (same code path as real agents) and the job still publishes a LoHa adapter.
    spec = _sim_spec(tmp_path, 3)
    spec.write_text(spec.read_text().replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj, lm_head]}",
                                             "peft: {method: loha, r: 4, alpha: 4}"))
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "3", "--batch-clients", "3",
                       "--client-resources", "cpus=1", "--out", str(tmp_path / "sim"), timeout=600,
                       env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s+\d+/\d+\s", line)]
    assert [r.split()[:2] for r in rows] == [["1", "3/3"], ["2", "3/3"]]
    assert "batched training: 0 shared passes trained 0 client updates" in proc.stdout
    (adapter,) = (tmp_path / "sim" / "coordinator" / "adapters").glob("*/round-2")
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LOHA"


def test_a_coordinator_host_this_machine_cannot_listen_on_is_refused_before_ray_starts(tmp_path: Path) -> None:
    # 192.0.2.123 (TEST-NET-1): not an address of this machine.
    proc = fedtune_cmd("simulate", "--config", str(_sim_spec(tmp_path, 2)), "--clients", "2",
                       "--coordinator-host", "192.0.2.123", timeout=120)
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--coordinator-host 192.0.2.123: cannot listen there (Cannot assign requested address); pass an address "
        "of this machine that the Ray cluster's workers can reach")


def test_the_simulation_coordinator_listens_where_the_cluster_reaches_it() -> None:
    from fedtune.simulation.runner import _coordinator_host

    class FakeRay:  # what Ray reports: this driver's node and its IP
        def get_runtime_context(self):  # type: ignore[no-untyped-def]
            return type("Ctx", (), {"get_node_id": lambda _self: "n1"})()

        def nodes(self) -> list[dict[str, str]]:
            return [{"NodeID": "n0", "NodeManagerAddress": "10.0.0.4"}, {"NodeID": "n1", "NodeManagerAddress": "10.0.0.5"}]

    ray = FakeRay()
    assert _coordinator_host(ray, None, None) == ("127.0.0.1", "127.0.0.1")
    assert _coordinator_host(ray, "10.0.0.4:6379", None) == ("10.0.0.5", "10.0.0.5")
    assert _coordinator_host(ray, "10.0.0.4:6379", "0.0.0.0") == ("0.0.0.0", "10.0.0.5")
    assert _coordinator_host(ray, "10.0.0.4:6379", "10.1.2.3") == ("10.1.2.3", "10.1.2.3")
