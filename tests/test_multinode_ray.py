"""Multi-node Ray on a real two-node cluster on this machine: a head with 1 CPU and a second node
with 2 CPUs, each started with `ray start` in its own temp dir, with token authentication.

A job whose quota only the second node has gets its reservation and its compute there (with the
base from the object store and its eval data sent to that node), while its engine stays with the
coordinator's state dir; a job that no single node can hold is queued naming each node; `fedtune
simulate --ray-address` runs virtual clients on the second node against a coordinator they reach.
The coordinator and the probes are separate processes: the test process never joins a Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.cli.admin_client import AdminClient
from fedtune.client.channel import INSECURE
from fedtune.demo import wait_for_coordinator
from fedtune.protos import fedtune_pb2 as pb
from tests.conftest import REPO, fedtune_cmd, free_port, make_spec, spawn, wait_until

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY = Path(sys.executable).parent / "ray"


@dataclass
class Cluster:
    """A running two-node Ray cluster of this test module's own."""

    address: str  # the head's GCS, at the IP Ray picked for this machine
    ip: str
    env: dict[str, str]  # what a process needs to join it (its token)
    head_temp: Path
    node2_temp: Path
    node2_files: Path  # where the second node's workers write files sent from the coordinator's node
    procs: list[subprocess.Popen[bytes]]  # `ray start --block` of the head and of the second node


def _ray_start(args: list[str], temp: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ray start --block` for one node, in its own session so that stopping it stops only its processes."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"]
    own_ports = [f"{flag}={free_port()}" for flag in ports]
    return subprocess.Popen(
        [str(RAY), "start", "--block", *args, "--temp-dir", str(temp), "--object-store-memory=200000000",
         "--disable-usage-stats", *own_ports],
        env=env, stdout=(temp / "ray-start.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _pids_under(temp: Path) -> list[int]:
    """Processes of this user whose command line names ``temp`` (this module's nodes' Ray processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(temp) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop(procs: list[subprocess.Popen[bytes]], temps: list[Path]) -> None:
    """Stops this module's nodes only: `ray start --block` stops its node on SIGTERM; stragglers that
    name our temp dirs are killed by process id. Other people's Ray on this machine is untouched."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    for temp in temps:
        for pid in _pids_under(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    # A token of this module's own: Ray 2.60's token authentication, as a real cluster would have it.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # Ray's socket paths are length-limited: short temp dirs.
    head_temp = Path(tempfile.mkdtemp(prefix="ftmn-h-", dir="/tmp"))
    node2_temp = Path(tempfile.mkdtemp(prefix="ftmn-w-", dir="/tmp"))
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_ray_start(["--head", f"--port={port}", "--num-cpus=1", '--resources={"head": 1}',
                                 "--include-dashboard=false", f"--dashboard-port={free_port()}",
                                 f"--ray-client-server-port={free_port()}"], head_temp, env))

        def started(temp: Path, proc: subprocess.Popen[bytes]) -> bool:
            log = (temp / "ray-start.log").read_text(errors="replace")
            assert proc.poll() is None, log[-3000:]
            return "Ray runtime started" in log

        wait_until(lambda: started(head_temp, procs[0]), timeout=120, interval=0.5, what="the Ray head")
        node2_files = node2_temp / "node-files"
        procs.append(_ray_start([f"--address={ip}:{port}", "--num-cpus=2", '--resources={"node2": 1}'], node2_temp,
                                {**env, "FEDTUNE_NODE_FILES_DIR": str(node2_files)}))
        wait_until(lambda: started(node2_temp, procs[1]), timeout=120, interval=0.5, what="the second Ray node")
        yield Cluster(f"{ip}:{port}", ip, {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}, head_temp,
                      node2_temp, node2_files, procs)
    finally:
        _stop(procs, [head_temp, node2_temp])


_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fedtune.cluster.connect import connect
    ray = connect(sys.argv[1], Path(sys.argv[2]))
    from ray.util.placement_group import placement_group_table
    out = {"nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}, "actors": {}, "groups": {}}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        actor = ray.get_actor(name, namespace=entry["namespace"])
        if name.startswith("fedtune-compute-"):
            out["actors"][name] = ray.get(actor.node.remote(), timeout=60)
        elif name.startswith("fedtune-engine-"):
            out["actors"][name] = {"node_id": ray.get(actor.node_id.remote(), timeout=60),
                                   "pid": ray.get(actor.pid.remote(), timeout=60)}
    for group in placement_group_table().values():
        if group["name"].startswith("fedtune-quota-") and group["state"] == "CREATED":
            out["groups"][group["name"]] = {"bundles": group["bundles"], "node": group["bundles_to_node_id"][0]}
    print(json.dumps(out))
""")


def _probe(cluster: Cluster, tmp_path: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """What runs where, as Ray reports it, from a separate driver process."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, cluster.address, str(tmp_path / "probe")],
                          capture_output=True, text=True, timeout=180, cwd=REPO,
                          env={**os.environ, **cluster.env, "RAY_USAGE_STATS_ENABLED": "0"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@dataclass
class Coordinator:
    address: str
    state_dir: Path
    admin: AdminClient


@pytest.fixture(scope="module")
def coordinator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("multinode")
    state_dir = root / "state"
    proc = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                 "--ray-address", cluster.address, log=root / "coordinator.log", env=cluster.env)
    try:
        address = wait_for_coordinator(state_dir, proc, INSECURE, timeout=180)
        admin = AdminClient(address, (state_dir / "admin.token").read_text().strip(), INSECURE)
        yield Coordinator(address, state_dir, admin)
        admin.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def _spec(eval_data: Path, name: str, cpus: float) -> str:
    return make_spec(eval_data, rounds=1, steps=4).replace("name: test", f"name: {name}") + f"resources: {{cpus: {cpus}}}\n"


def _node(probe: dict[str, dict], resource: str) -> str:  # type: ignore[type-arg]
    (node,) = [node for node, resources in probe["nodes"].items() if resource in resources]
    return node


def test_a_job_only_the_second_node_can_hold_computes_there_while_its_engine_stays_by_the_state_dir(
        cluster: Cluster, coordinator: Coordinator, fed_data: tuple[list[Path], Path], tmp_path: Path) -> None:
    data, eval_file = fed_data
    admin = coordinator.admin
    # 2 CPUs in one job: the head has 1, the second node 2.
    job = admin.call("CreateJob", pb.CreateJobRequest(spec_yaml=_spec(eval_file, "needs-node2", 2))).job_id  # type: ignore[attr-defined]
    wait_until(lambda: admin.call("GetJob", pb.GetJobRequest(job_id=job)).state == "running",  # type: ignore[attr-defined]
               timeout=60, what="the job to be placed")
    seen = _probe(cluster, tmp_path)
    head, node2 = _node(seen, "head"), _node(seen, "node2")
    # Its quota is held in Ray on the second node...
    quota = seen["groups"][f"fedtune-quota-{job}"]
    assert quota["node"] == node2 and quota["bundles"] == {"0": {"CPU": 2.0}}
    # ...its base's compute actor runs there, in a process of that node's raylet...
    (compute,) = [a for name, a in seen["actors"].items() if name.startswith("fedtune-compute-")]
    assert compute["node_id"] == node2 and "node2" in compute["resources"]
    parent = int(Path(f"/proc/{compute['pid']}/status").read_text().split("PPid:")[1].split()[0])
    assert str(cluster.node2_temp) in Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
    # ...while the engine, which opens the state dir's SQLite database, is on the coordinator's node.
    (engine,) = [a for name, a in seen["actors"].items() if name.startswith(f"fedtune-engine-{job}")]
    assert engine["node_id"] == head

    client = spawn("client", "run", "--coordinator", coordinator.address, "--token",
                   admin.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=1)).token,  # type: ignore[attr-defined]
                   "--data", str(data[0]), "--state-dir", str(tmp_path / "c0"), "--no-progress", "--insecure",
                   log=tmp_path / "c0.log")
    assert client.wait(timeout=300) == 0, (tmp_path / "c0.log").read_text()[-3000:]
    status = admin.call("GetJob", pb.GetJobRequest(job_id=job))
    assert status.state == "finished", status.message  # type: ignore[attr-defined]
    # Evaluated on the second node over the base from the object store: the adapter lowered the loss,
    # with the base's config and the eval data written there from the coordinator's node.
    metrics = json.loads(status.history[-1].metrics_json)  # type: ignore[attr-defined]
    assert metrics["eval_loss"] < json.loads(status.base_metrics_json)["eval_loss"]  # type: ignore[attr-defined]
    sent = {p.name for p in cluster.node2_files.glob("*/*")}
    assert eval_file.name in sent and any((d / "config.json").is_file() for d in cluster.node2_files.glob("*/*"))
    assert not list(cluster.node2_files.glob("*/*/*.safetensors"))  # weights come from the object store
    # The job's quota went back to the cluster when it ended.
    wait_until(lambda: f"fedtune-quota-{job}" not in _probe(cluster, tmp_path)["groups"], timeout=60,
               what="the quota to be released")


def test_a_job_no_single_node_can_hold_is_queued_naming_each_node(
        cluster: Cluster, coordinator: Coordinator, fed_data: tuple[list[Path], Path], tmp_path: Path) -> None:
    admin = coordinator.admin
    # 3 CPUs: the cluster has them in all (1 + 2), but no node does.
    job = admin.call("CreateJob", pb.CreateJobRequest(spec_yaml=_spec(fed_data[1], "spread", 3))).job_id  # type: ignore[attr-defined]
    time.sleep(2)  # a few scheduler ticks
    status = admin.call("GetJob", pb.GetJobRequest(job_id=job))
    assert status.state == "queued"  # type: ignore[attr-defined]
    reason = status.scheduling.reason  # type: ignore[attr-defined]
    seen = _probe(cluster, tmp_path)
    head, node2 = _node(seen, "head"), _node(seen, "node2")
    assert reason.startswith("needs 3 CPUs on one node; no node has that (the cluster has that only in all, "
                             "spread over nodes): "), reason
    assert f"{cluster.ip} (node {head[:8]}, head) 1 CPU" in reason and f"{cluster.ip} (node {node2[:8]}) 2 CPUs" in reason
    assert f"fedtune-quota-{job}" not in seen["groups"]
    shown = fedtune_cmd("job", "status", job, "--state-dir", str(coordinator.state_dir), check=True).stdout
    assert "queued, place 1: needs 3 CPUs on one node; no node has that" in shown
    admin.call("CancelJob", pb.GetJobRequest(job_id=job))


def test_simulate_on_the_cluster_runs_clients_on_the_second_node_against_a_coordinator_they_reach(
        cluster: Cluster, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(make_spec(steps=2, clients=2, deadline=300))
    # A 2-CPU worker: only the second node can hold it, so every virtual client runs there.
    proc = fedtune_cmd("simulate", "--config", str(spec), "--clients", "2", "--client-resources", "cpus=2",
                       "--ray-address", cluster.address, "--out", str(tmp_path / "sim"),
                       timeout=480, env={**cluster.env, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # The coordinator listened at the IP Ray reports for this node, not on loopback.
    assert f"coordinator {cluster.ip}:" in proc.stdout
    runs = json.loads((tmp_path / "sim" / "simulation.json").read_text())["runs"]
    node2 = _node(_probe(cluster, tmp_path), "node2")
    assert {r["node_id"] for r in runs} == {node2}, runs
    assert sum(len(r["clients"]) for r in runs) == 2
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if line.strip().startswith("1 ")]
    assert rows == [["1", "2/2"]], proc.stdout


def test_a_job_whose_node_leaves_goes_back_to_the_queue(
        cluster: Cluster, coordinator: Coordinator, fed_data: tuple[list[Path], Path], tmp_path: Path) -> None:
    admin = coordinator.admin
    job = admin.call("CreateJob", pb.CreateJobRequest(spec_yaml=_spec(fed_data[1], "orphan", 2))).job_id  # type: ignore[attr-defined]
    wait_until(lambda: admin.call("GetJob", pb.GetJobRequest(job_id=job)).state == "running",  # type: ignore[attr-defined]
               timeout=60, what="the job to be placed on the second node")
    # The second node stops (the last test: the others need it).
    cluster.procs[1].send_signal(signal.SIGTERM)
    cluster.procs[1].wait(60)
    status = wait_until(lambda: (s := admin.call("GetJob", pb.GetJobRequest(job_id=job))).state == "queued" and s,
                        timeout=120, what="the job to be queued again")
    # Only the head is left, and it cannot hold 2 CPUs: the job waits, saying so.
    assert status.scheduling.reason.startswith(f"needs 2 CPUs; {cluster.ip} (node "), status.scheduling.reason  # type: ignore[attr-defined]
    assert "head) has 1 CPU" in status.scheduling.reason  # type: ignore[attr-defined]
    admin.call("CancelJob", pb.GetJobRequest(job_id=job))
