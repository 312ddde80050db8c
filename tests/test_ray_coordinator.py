"""The coordinator on Ray: jobs as actors over one shared base, restarts, queue, existing clusters.

One local Ray serves the module's in-process coordinator (starting Ray costs seconds); the
external-cluster tests start their own `ray start --head` and coordinator processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedtune.cli.admin_client import AdminClient
from fedtune.client.channel import INSECURE
from fedtune.coordinator.server import RunningCoordinator, start
from fedtune.demo import wait_for_coordinator
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import Admin, fedtune_cmd, make_spec, spawn, wait_until
from tests.test_offsite import _blocks_spec
from tests.test_secure_rounds import SECURE, N, _drive, _expected, _federation, _published_delta

pytest.importorskip("ray")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start(tmp_path_factory.mktemp("raycoord") / "state", "127.0.0.1", 0, insecure=True, ray=True)
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def ray_admin(ray_coordinator: RunningCoordinator) -> Iterator[Admin]:
    a = Admin(ray_coordinator)
    yield a
    a.channel.close()


def _run_clients(running: RunningCoordinator, admin: Admin, jobs: list[str], data: list[Path], tmp_path: Path,
                 while_running: Callable[[], None] | None = None) -> None:
    """One client agent process per job (client i on data[i]) until every job ends."""
    procs = [spawn("client", "run", "--coordinator", running.address, "--token", admin.token(job),
                   "--data", str(data[i]), "--state-dir", str(tmp_path / f"c{i}"), "--no-progress", "--insecure",
                   log=tmp_path / f"c{i}.log") for i, job in enumerate(jobs)]
    try:
        if while_running is not None:
            while_running()
        for i, p in enumerate(procs):
            assert p.wait(timeout=300) == 0, (tmp_path / f"c{i}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _spec(eval_data: Path, name: str, r: int, targets: str, *, rounds: int = 2, cpus: float = 0.5,
          priority: int = 0) -> str:
    spec = make_spec(eval_data, rounds=rounds, steps=4).replace("name: test", f"name: {name}")
    spec = spec.replace("peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                        f"peft: {{r: {r}, alpha: {2 * r}, target_modules: [{targets}]}}")
    return spec + f"priority: {priority}\nresources: {{cpus: {cpus}}}\n"


def test_two_jobs_with_different_peft_share_one_base_and_both_publish(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path],
        tmp_path: Path) -> None:
    data, eval_file = fed_data
    # Three rounds: one job's client may start seconds before the other's, and each job's engine
    # must still be running when it is inspected after its first publication.
    a = ray_admin.create_job(_spec(eval_file, "qv-r4", 4, "q_proj, v_proj", rounds=3))
    # b aggregates with FedAdam: its moments come back from the compute actor and are kept per round.
    b = ray_admin.create_job(_spec(eval_file, "mlp-r8", 8, "gate_proj, up_proj, down_proj", rounds=3)
                             + "aggregation: {strategy: fedadam, options: {server_lr: 0.01}}\n")
    backend = ray_coordinator.coordinator.ray
    assert backend is not None
    # Both run at once as actors, on one copy of the base in the object store.
    status_a, status_b = ray_admin.job(a), ray_admin.job(b)
    assert status_a.state == status_b.state == "running"
    assert status_a.scheduling.backend == "ray" and status_a.scheduling.cpus == 0.5
    assert len(backend._bases) == 1
    import ray

    pids = {ray.get(backend.actor(j).pid.remote()) for j in (a, b)}
    assert os.getpid() not in pids and len(pids) == 2
    # Both jobs' aggregation and evaluation go to one compute process of that base.
    (compute,) = backend._computes.values()
    compute_pid = ray.get(compute.actor.pid.remote())
    assert compute_pid not in pids | {os.getpid()}

    engines_without_torch: dict[str, bool] = {}

    def inspect_engines_after_their_first_publication() -> bool:
        for j in (a, b):
            if j not in engines_without_torch and any(h.state == "published" for h in ray_admin.job(j).history):
                engines_without_torch[j] = not ray.get(backend.actor(j).imported.remote("torch"))
        return len(engines_without_torch) == 2

    def kill_compute_after_round_1() -> None:
        wait_until(inspect_engines_after_their_first_publication, timeout=240, what="round 1 of both jobs")
        os.kill(compute_pid, signal.SIGKILL)

    # Killing the compute process mid-job: the scheduler starts a new one and both jobs go on.
    _run_clients(ray_coordinator, ray_admin, [a, b], data, tmp_path, while_running=kill_compute_after_round_1)
    # After aggregating, evaluating and publishing a round, neither engine process had imported
    # torch (~150 MiB each): they move adapters as bytes only.
    assert engines_without_torch == {a: True, b: True}
    assert ray.get(next(iter(backend._computes.values())).actor.pid.remote()) != compute_pid
    for job, targets in ((a, {"q_proj", "v_proj"}), (b, {"gate_proj", "up_proj", "down_proj"})):
        status = ray_admin.job(job)
        assert status.state == "finished", status.message
        assert [h.round for h in status.history] == [1, 2, 3]
        # Evaluated over the shared base: the adapter improved the eval loss.
        base_loss = json.loads(status.base_metrics_json)["eval_loss"]
        assert json.loads(status.history[-1].metrics_json)["eval_loss"] < base_loss
        adapter = Path(ray_coordinator.coordinator.state.published(job)[-1][2])
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == targets
    state = ray_coordinator.coordinator.state
    assert all(state.strategy_state(b, r) for r in (1, 2, 3)) and not state.strategy_state(a, 1)


def test_killed_job_actor_restarts_from_its_checkpoint_while_the_other_job_finishes(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path],
        tmp_path: Path) -> None:
    data, eval_file = fed_data
    victim = ray_admin.create_job(_spec(eval_file, "victim", 4, "q_proj, v_proj", rounds=3))
    other = ray_admin.create_job(_spec(eval_file, "other", 4, "q_proj, v_proj", rounds=3))
    backend = ray_coordinator.coordinator.ray
    assert backend is not None
    import ray

    def kill_victim_after_round_1() -> None:
        wait_until(lambda: len(ray_admin.job(victim).history) >= 1
                   and ray_admin.job(victim).history[0].state == "published", timeout=240, what="round 1")
        killed.append(ray.get(backend.actor(victim).pid.remote()))
        os.kill(killed[0], signal.SIGKILL)

    killed: list[int] = []
    _run_clients(ray_coordinator, ray_admin, [victim, other], data, tmp_path, while_running=kill_victim_after_round_1)
    for job in (victim, other):
        status = ray_admin.job(job)
        assert status.state == "finished", status.message
        assert [h.round for h in status.history] == [1, 2, 3]
        assert all(h.contributors == 1 for h in status.history)
    assert ray_admin.job(victim).scheduling.engine_restarts == 1
    assert ray_admin.job(other).scheduling.engine_restarts == 0


def test_job_asking_for_more_than_the_cluster_has_is_queued_with_the_reason(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path]) -> None:
    _, eval_file = fed_data
    big = ray_admin.create_job(_spec(eval_file, "big", 4, "q_proj", cpus=64))
    status = ray_admin.job(big)
    assert status.state == "queued"
    assert status.scheduling.queue_position >= 1
    assert "needs 64 CPUs" in status.scheduling.reason and "in all" in status.scheduling.reason
    # It blocks nobody: a job that fits starts at once.
    small = ray_admin.create_job(_spec(eval_file, "small", 4, "q_proj", cpus=0.25))
    assert ray_admin.job(small).state == "running"
    # Operators see the same through the CLI.
    state_dir = ray_coordinator.coordinator.state_dir
    shown = fedtune_cmd("job", "status", big, "--state-dir", str(state_dir), check=True).stdout
    assert "scheduling: ray, priority 0, quota 64 CPU; queued, place 1: needs 64 CPUs" in shown
    listed = fedtune_cmd("job", "list", "--state-dir", str(state_dir), check=True).stdout
    assert f"{big}  queued" in listed and "(place 1)" in listed
    for job in (big, small):
        ray_admin.stub.CancelJob(pb.GetJobRequest(job_id=job), metadata=ray_admin.md)


def test_the_compute_actor_evaluates_with_the_running_jobs_cpu_quotas(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path]) -> None:
    backend = ray_coordinator.coordinator.ray
    assert backend is not None
    if backend.total().cpus < 2:
        pytest.skip("needs a Ray with 2 CPUs for two 1-CPU jobs at once")
    import ray

    _, eval_file = fed_data
    first = ray_admin.create_job(_spec(eval_file, "one-cpu", 4, "q_proj", cpus=1))
    compute = backend._computes[(ray_coordinator.coordinator.state.job(first).base_hash, backend.node_of(first))]

    def threads(n: int) -> bool:
        return bool(ray.get(compute.actor.threads.remote()) == n)

    # Ray starts a 0-CPU actor with OMP_NUM_THREADS=1; the scheduler sizes it by the quotas instead.
    wait_until(lambda: threads(1), timeout=30, what="1 evaluation thread for one 1-CPU job")
    second = ray_admin.create_job(_spec(eval_file, "another-cpu", 4, "q_proj", cpus=1))
    # (Running at once, or as soon as the scheduler reaps a job of an earlier test that just ended.)
    wait_until(lambda: ray_admin.job(second).state == "running", timeout=30, what="the second job to start")
    wait_until(lambda: threads(2), timeout=30, what="2 evaluation threads for two 1-CPU jobs")
    ray_admin.stub.CancelJob(pb.GetJobRequest(job_id=second), metadata=ray_admin.md)
    wait_until(lambda: threads(1), timeout=30, what="1 thread again once the second job ends")
    ray_admin.stub.CancelJob(pb.GetJobRequest(job_id=first), metadata=ray_admin.md)


def test_a_job_whose_base_cannot_be_shared_fails_with_the_reason(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path],
        tmp_path: Path) -> None:
    import torch

    from fedtune.models import TINY_PRESET, load_causal_lm, materialize_preset

    preset = materialize_preset(TINY_PRESET, tmp_path / "preset")
    base = tmp_path / "bin-base"
    # A legacy base with torch-format weights (pytorch_model.bin), which the object store path does not read
    # (transformers 5 only writes safetensors, so the file is written directly).
    base.mkdir()
    for f in preset.iterdir():
        if not f.name.endswith(".safetensors"):
            (base / f.name).write_bytes(f.read_bytes())
    torch.save(load_causal_lm(preset, torch.device("cpu")).state_dict(), base / "pytorch_model.bin")
    spec = _spec(fed_data[1], "bin", 4, "q_proj").replace("base_model: tiny-llama", f"base_model: {base}")
    job = ray_admin.create_job(spec)
    status = wait_until(lambda: ray_admin.job(job) if ray_admin.job(job).state == "failed" else None, timeout=30,
                        what="job failed")
    assert "has no *.safetensors weights to share" in status.message
    assert job not in ray_coordinator.coordinator.ray._running  # type: ignore[union-attr]


def test_an_offsite_block_tuning_job_runs_and_publishes_on_ray(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path],
        base6: Path, tmp_path: Path) -> None:
    data, eval_file = fed_data
    job = ray_admin.create_job(_blocks_spec(base6, eval_file, clients=1))
    _run_clients(ray_coordinator, ray_admin, [job], data, tmp_path)
    status = ray_admin.job(job)
    assert status.state == "finished", status.message
    metrics = json.loads(status.history[-1].metrics_json)
    # Evaluated by the base's compute actor: the plug-in (full model + tuned blocks) beats zero-shot.
    assert metrics["eval_loss"] < metrics["zero_shot_eval_loss"]
    adapter = Path(ray_coordinator.coordinator.state.published(job)[-1][2])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["layers.0", "layers.5"]


def test_a_secure_aggregation_job_on_ray_gives_the_exact_fedavg_from_an_engine_without_torch(
        ray_coordinator: RunningCoordinator, ray_admin: Admin) -> None:
    spec = (make_spec(clients=N, min_clients=9, deadline=60, rounds=2, cohort_wait=30) + SECURE.format(phase=5, attempts=3)
            + "resources: {cpus: 0.5}\n")
    job = ray_admin.create_job(spec)
    backend = ray_coordinator.coordinator.ray
    assert backend is not None
    import ray

    # Client 9 masks its input, then drops before unmasking: its self-mask must still be removed.
    clients = _federation(ray_coordinator, ray_admin, job, {9: pb.UNMASK})
    state = ray_coordinator.coordinator.state
    _drive(clients, lambda: (r := state.find_round(job, 1)) is not None and r.state == "published", timeout=180)
    # The engine unmasked the sum with numpy alone; the compute actor made it tensors.
    assert ray.get(backend.actor(job).imported.remote("torch")) is False
    delta = _published_delta(ray_coordinator, job)
    expected = _expected(clients, list(range(N)))
    for v in delta.values():
        assert float((v - expected).abs().max()) < 1e-5
    assert state.round(job, 1).metrics["contributors"] == N
    clients[9].drop_at = None  # round 2 without a dropout: it need not wait out the unmask phase
    _drive(clients, lambda: state.job(job).state == "finished", timeout=180)
    assert state.round(job, 2).metrics["contributors"] == N


def test_unreachable_ray_address_fails_at_start_naming_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    proc = fedtune_cmd("coordinator", "start", "--state-dir", str(tmp_path / "s"), "--port", "0", "--insecure",
                       "--ray-address", address, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert f"cannot reach the Ray cluster at {address}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_coordinator_joins_a_ray_head_started_separately(tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    data, eval_file = fed_data
    port = _free_port()
    # Ray's socket paths are length-limited: a short temp dir of the head's own.
    temp = Path(tempfile.mkdtemp(prefix="fth-", dir="/tmp"))
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.run([str(ray_bin), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                           "--num-cpus", "2", "--include-dashboard=false", "--temp-dir", str(temp),
                           "--disable-usage-stats"], check=False, env=env, capture_output=True, text=True, timeout=120)
    coord = None
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        state_dir = tmp_path / "coord"
        coord = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                      "--ray-address", f"127.0.0.1:{port}", log=tmp_path / "coord.log")
        address = wait_for_coordinator(state_dir, coord, INSECURE, timeout=120)
        admin = AdminClient(address, (state_dir / "admin.token").read_text().strip(), INSECURE)
        job = admin.call("CreateJob", pb.CreateJobRequest(
            spec_yaml=_spec(eval_file, "on-head", 4, "q_proj, v_proj", rounds=1))).job_id  # type: ignore[attr-defined]
        token = admin.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=1)).token  # type: ignore[attr-defined]
        client = spawn("client", "run", "--coordinator", address, "--token", token, "--data", str(data[0]),
                       "--state-dir", str(tmp_path / "c0"), "--no-progress", "--insecure", log=tmp_path / "c0.log")
        assert client.wait(timeout=300) == 0, (tmp_path / "c0.log").read_text()[-3000:]
        status = admin.call("GetJob", pb.GetJobRequest(job_id=job))
        assert status.state == "finished", status.message  # type: ignore[attr-defined]
        assert status.scheduling.backend == "ray"  # type: ignore[attr-defined]
        # The job's engine ran in the separately started cluster, which the coordinator did not start.
        assert "on 127.0.0.1:" in (tmp_path / "coord.log").read_text()
        logs = "".join(p.read_text(errors="replace") for p in temp.glob("session_*/logs/worker-*.out"))
        assert "JobActor" in logs
        assert not (state_dir / "ray").exists()
    finally:
        if coord is not None and coord.poll() is None:
            coord.terminate()
            coord.wait(30)
        # Stop only this head (ray stop would stop every Ray of this user).
        subprocess.run(["pkill", "-f", str(temp)], check=False)
        time.sleep(1)
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def test_without_ray_jobs_run_in_process_and_the_coordinator_says_how_to_enable_ray(
        tmp_path: Path, fed_data: tuple[list[Path], Path]) -> None:
    data, eval_file = fed_data
    # A `ray` that cannot be imported, first on the path: as on a machine without Ray.
    (tmp_path / "noray" / "ray").mkdir(parents=True)
    (tmp_path / "noray" / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "noray"), os.environ.get("PYTHONPATH", "")])}
    state_dir = tmp_path / "coord"
    coord = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                  log=tmp_path / "coord.log", env=env)
    try:
        address = wait_for_coordinator(state_dir, coord, INSECURE, timeout=120)
        admin = AdminClient(address, (state_dir / "admin.token").read_text().strip(), INSECURE)
        job = admin.call("CreateJob", pb.CreateJobRequest(
            spec_yaml=_spec(eval_file, "no-ray", 4, "q_proj", rounds=1, cpus=64))).job_id  # type: ignore[attr-defined]
        token = admin.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=1)).token  # type: ignore[attr-defined]
        client = spawn("client", "run", "--coordinator", address, "--token", token, "--data", str(data[0]),
                       "--state-dir", str(tmp_path / "c0"), "--no-progress", "--insecure", log=tmp_path / "c0.log")
        assert client.wait(timeout=300) == 0, (tmp_path / "c0.log").read_text()[-3000:]
        status = admin.call("GetJob", pb.GetJobRequest(job_id=job))
        # In-process there are no quotas: even a job asking for 64 CPUs runs.
        assert status.state == "finished" and status.scheduling.backend == "in-process"  # type: ignore[attr-defined]
    finally:
        coord.terminate()
        coord.wait(30)
    log = (tmp_path / "coord.log").read_text()
    assert "Ray is not installed: jobs run in this process without quotas; pip install 'fedtune[ray]'" in log


def test_jobs_of_different_peft_methods_share_one_base_on_ray(
        ray_coordinator: RunningCoordinator, ray_admin: Admin, fed_data: tuple[list[Path], Path],
        tmp_path: Path) -> None:
    data, eval_file = fed_data
    specs = {"bottleneck": "{method: bottleneck, bottleneck_size: 8}", "ia3": "{method: ia3}"}
    jobs = {}
    for method, peft in specs.items():
        spec = _spec(eval_file, method, 4, "q_proj, v_proj").replace(
            "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", f"peft: {peft}")
        jobs[method] = ray_admin.create_job(spec.replace("lr: 0.01", "lr: 0.03"))
    backend = ray_coordinator.coordinator.ray
    assert backend is not None
    _run_clients(ray_coordinator, ray_admin, list(jobs.values()), data, tmp_path)
    # One copy of the base for both methods (the module's other tests may have put other bases).
    (base_hash,) = {ray_coordinator.coordinator.state.job(j).base_hash for j in jobs.values()}
    assert base_hash in backend._bases
    for method, job in jobs.items():
        status = ray_admin.job(job)
        assert status.state == "finished", status.message
        base_loss = json.loads(status.base_metrics_json)["eval_loss"]
        assert json.loads(status.history[-1].metrics_json)["eval_loss"] < base_loss
        adapter = Path(ray_coordinator.coordinator.state.published(job)[-1][2])
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"].lower() == method
