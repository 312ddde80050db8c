"""Observability on a real job: the coordinator's Prometheus endpoint scraped over HTTP while the job
runs, `job status --watch` following it, and `job report` rendered in headless Chromium. The
coordinator, the client agents, the watch and the report are separate processes started through
the CLI; the job is tiny (2 rounds, 2 clients, 2 steps) with DP on, so that every series has data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from fedtune.client.channel import INSECURE
from fedtune.client.transfer import upload_messages
from fedtune.crypto.envelope import SCHEME
from fedtune.crypto.keys import raw_public_bytes
from fedtune.crypto.requests import sign_request
from fedtune.demo import wait_for_coordinator
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc
from tests.conftest import REPO, fedtune_cmd, make_spec, spawn, wait_until

CHROMIUM = Path("/usr/bin/chromium")
SERIES = ("eval_loss", "client_train_loss", "bytes", "participation", "dp_epsilon")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> Samples:
    """Every sample of one scrape, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@dataclass
class LiveJob:
    """A finished job and what was seen while it ran."""

    state_dir: Path
    root: Path
    address: str
    job: str
    metrics_url: str
    scrapes: list[Samples] = field(default_factory=list)
    before_job: Samples = field(default_factory=dict)
    final: Samples = field(default_factory=dict)
    watch_rc: int | None = None
    watch_out: str = ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return fedtune_cmd(*args, "--state-dir", str(self.state_dir), timeout=timeout)

    def admin(self, method: str, request: object) -> object:
        """An admin call over gRPC (quicker than a CLI process where the CLI is not what is tested)."""
        token = (self.state_dir / "admin.token").read_text().strip()
        with grpc.insecure_channel(self.address) as channel:
            return getattr(pb_grpc.AdminServiceStub(channel), method)(
                request, metadata=[("x-fedtune-admin", token)], timeout=60)

    def create_job(self, spec: str) -> str:
        return self.admin("CreateJob", pb.CreateJobRequest(spec_yaml=spec)).job_id  # type: ignore[attr-defined]

    def token(self, job: str, uses: int) -> str:
        reply = self.admin("CreateToken", pb.CreateTokenRequest(job_id=job, uses=uses, ttl_seconds=3600))
        return reply.token  # type: ignore[attr-defined]


class Uploader:
    """A client that joins and uploads exactly what a test says, without training."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ClientServiceStub(self.channel)
        self.key = Ed25519PrivateKey.generate()
        self.client_id = self.stub.Join(pb.JoinRequest(
            token=token, client_name="uploader", sign_public_key=raw_public_bytes(self.key),
            kx_public_key=raw_public_bytes(X25519PrivateKey.generate()))).client_id

    def md(self, method: str) -> list[tuple[str, str]]:
        return sign_request(self.key, f"/fedtune.v1.ClientService/{method}", self.client_id)

    def task(self) -> pb.Task:
        def poll() -> pb.Task | None:
            reply = self.stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id), metadata=self.md("Heartbeat"))
            return reply.task if reply.action == pb.HeartbeatReply.TRAIN else None

        return wait_until(poll, timeout=60, what="a task")

    def upload(self, task: pb.Task, payload: bytes, **header: Any) -> grpc.StatusCode:
        """Uploads ``payload`` under a header the test may spoil; the status it was refused with."""
        fields: dict[str, Any] = {
            "job_id": task.job_id, "round": task.round, "task_id": task.task_id, "update_id": os.urandom(8).hex(),
            "num_examples": 10, "codec": "fp32", "envelope": SCHEME, "total_size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(), **header}
        with pytest.raises(grpc.RpcError) as refused:
            self.stub.Upload(upload_messages(pb.UpdateHeader(**fields), payload), metadata=self.md("Upload"))
        return refused.value.code()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def live_job(tmp_path_factory: pytest.TempPathFactory, fed_data) -> Iterator[LiveJob]:  # type: ignore[no-untyped-def]
    clients, eval_file = fed_data
    root = tmp_path_factory.mktemp("observed")
    state_dir = root / "coord"
    metrics_port = _free_port()
    coord = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                  "--in-process", "--metrics-port", str(metrics_port), log=root / "coordinator.log")
    procs = [coord]
    stop = threading.Event()
    scraper: threading.Thread | None = None
    try:
        address = wait_for_coordinator(state_dir, coord, INSECURE, timeout=120)
        live = LiveJob(state_dir, root, address, "", f"http://127.0.0.1:{metrics_port}/metrics")
        live.before_job = scrape(live.metrics_url)
        # 24 local steps: a round lasts long enough (~0.5 s or more) for the 0.2 s scrapes to see it
        # mid-way; with 2 steps a round took ~0.1 s once the next opens as soon as the aggregate exists.
        live.job = live.create_job(make_spec(eval_file, rounds=2, clients=2, steps=24)
                                   + "privacy: {clip_norm: 1.0, noise_multiplier: 0.8}\n")
        watch_log = root / "watch.log"
        watch = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "job", "status", live.job, "--watch", "--interval", "0.3",
             "--state-dir", str(state_dir)], stdout=watch_log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        procs.append(watch)

        def keep_scraping() -> None:
            while not stop.wait(0.2):
                live.scrapes.append(scrape(live.metrics_url))

        scraper = threading.Thread(target=keep_scraping, daemon=True)
        scraper.start()
        token = live.token(live.job, uses=2)
        agents = [spawn("client", "run", "--coordinator", address, "--token", token, "--data", str(data),
                        "--state-dir", str(root / f"agent-{i}"), "--name", f"agent-{i}", "--no-progress",
                        "--insecure", log=root / f"agent-{i}.log") for i, data in enumerate(clients[:2])]
        procs += agents
        for i, agent in enumerate(agents):
            assert agent.wait(timeout=240) == 0, (root / f"agent-{i}.log").read_text()[-3000:]
        live.watch_rc = watch.wait(timeout=60)
        live.watch_out = watch_log.read_text(errors="replace")
        stop.set()
        scraper.join(timeout=15)
        live.final = scrape(live.metrics_url)
        yield live
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=20)


def test_metrics_counters_move_while_the_job_runs(live_job: LiveJob) -> None:
    job = live_job.job
    # Served before any job: the families are there, with no job's series yet.
    assert value(live_job.before_job, "fedtune_queue_length") == 0
    assert not any(labels for (name, labels) in live_job.before_job if name.startswith("fedtune_rounds"))

    published = [value(s, "fedtune_rounds_published_total", job=job) or 0 for s in live_job.scrapes]
    opened = [value(s, "fedtune_rounds_opened_total", job=job) or 0 for s in live_job.scrapes]
    accepted = [value(s, "fedtune_updates_accepted_total", job=job) or 0 for s in live_job.scrapes]
    assert len(live_job.scrapes) >= 5
    for series in (published, opened, accepted):
        assert series == sorted(series), f"a counter went back: {series}"
    # Seen mid-job: a round open with nothing published yet, then a round published before the end.
    assert any(o >= 1 and p == 0 for o, p in zip(opened, published, strict=True)), (opened, published)
    assert 1 in published or any(0 < a < 4 for a in accepted), (published, accepted)
    assert max(value(s, "fedtune_clients_connected", job=job) or 0 for s in live_job.scrapes) == 2

    final = live_job.final
    assert value(final, "fedtune_rounds_opened_total", job=job) == 2
    assert value(final, "fedtune_rounds_published_total", job=job) == 2
    assert value(final, "fedtune_updates_accepted_total", job=job) == 4
    assert value(final, "fedtune_clients_enrolled", job=job) == 2
    assert value(final, "fedtune_queue_position", job=job) == 0
    assert value(final, "fedtune_queue_length") == 0
    assert value(final, "fedtune_round_duration_seconds_count", job=job) == 2
    assert (value(final, "fedtune_round_duration_seconds_sum", job=job) or 0) > 0
    for phase in ("collect", "aggregate", "evaluate", "publish"):
        assert value(final, "fedtune_phase_duration_seconds_count", job=job, phase=phase) == 2, phase
    assert not [k for k in final if k[0] == "fedtune_updates_rejected_total"]

    # The same numbers the admin API reports.
    shown = live_job.cli("job", "status", job, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    sent = sum(u["bytes"] for r in status["history"] for u in r["client_updates"])
    assert value(final, "fedtune_bytes_up_total", job=job) == sent > 0
    served = sum(r["metrics"].get("bytes_down", 0) for r in status["history"])
    assert (value(final, "fedtune_bytes_down_total", job=job) or 0) >= served > 0
    epsilon = status["history"][-1]["metrics"]["epsilon"]
    assert value(final, "fedtune_dp_epsilon", job=job) == pytest.approx(epsilon) and epsilon > 0


def test_watch_follows_the_job_and_exits_when_it_ends(live_job: LiveJob) -> None:
    out = live_job.watch_out
    assert live_job.watch_rc == 0, out[-3000:]
    # Each frame starts with the line that names the job (boxes drawn in whatever the locale allows).
    frames = [f for f in re.split(rf"(?m)^(?=.*job {live_job.job} \(test\))", out) if f.strip()]
    assert len(frames) >= 2, out[-3000:]
    assert "round 1/2" in frames[0] and ("waiting for" in frames[0] or "training:" in frames[0]), frames[0]
    last = frames[-1]
    assert "finished" in last and "round 2/2" in last
    # Each client by name with its own train loss, and the rounds table.
    for name in ("agent-0", "agent-1"):
        row = next(line for line in last.splitlines() if name in line)
        assert re.search(r"\b\d+\.\d{4}\b", row), row
    assert re.search(r"(?m)^\W*\s+2\s+2/2\s+\d+\.\d{4}", last), last
    # Mid-job frames showed where the job was.
    assert any("training:" in f or "waiting for" in f for f in frames[:-1])


def test_report_has_one_plot_per_series_and_renders_in_chromium(live_job: LiveJob, tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    done = live_job.cli("job", "report", live_job.job, "--out", str(out_dir))
    assert done.returncode == 0, done.stderr
    index = Path(done.stdout.strip())
    assert index == (out_dir / "index.html").resolve() and done.stdout.count("\n") == 1
    page = index.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == sorted(f"plots/{s}.png" for s in SERIES)
    for series in SERIES:
        assert page.count(f"id='{series}'") == 1
    from PIL import Image

    for src in images:
        with Image.open(out_dir / src) as png:
            assert png.format == "PNG" and png.size == (560, 340)
    assert "agent-0" in page and "agent-1" in page
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: the report was not rendered in a browser")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "chromium-profile"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
                    index.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    import numpy as np

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2000, 1200)
    ink = (pixels.min(axis=2) < 200).mean()
    # Lines and bars in colour (matplotlib's blue and orange, the epsilon red), not only black text.
    colour = ((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean()
    assert ink > 0.02 and pixels.std() > 10, f"screenshot looks blank: {ink:.3%} ink"
    assert colour > 0.005, f"no plot rendered in the screenshot: {colour:.3%} coloured pixels"


def test_report_of_an_unknown_job_is_not_found(live_job: LiveJob, tmp_path: Path) -> None:
    out_dir = tmp_path / "nothing"
    done = live_job.cli("job", "report", "job-00000000", "--out", str(out_dir))
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "job-00000000" in done.stderr, done.stderr
    assert not out_dir.exists()


def test_a_metrics_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = fedtune_cmd("coordinator", "start", "--state-dir", str(tmp_path / "s"), "--port", "0", "--insecure",
                           "--in-process", "--metrics-port", str(port), timeout=120)
    assert done.returncode == 6, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"fedtune: error: cannot serve metrics on 127.0.0.1:{port}: address in use; pass another "
                     "--metrics-port (0 picks a free one)".replace("  ", " ")]
    # Nothing started: no address written, no state dir locked.
    assert not (tmp_path / "s" / "coordinator.json").exists()
    alone = fedtune_cmd("coordinator", "start", "--state-dir", str(tmp_path / "s"), "--insecure", "--in-process",
                        "--metrics-host", "0.0.0.0", timeout=120)
    assert alone.returncode == 3 and alone.stderr == "fedtune: error: --metrics-host needs --metrics-port\n"


def test_refused_uploads_are_counted_by_reason(live_job: LiveJob) -> None:
    job = live_job.create_job(make_spec(rounds=1, clients=1))
    uploader = Uploader(live_job.address, live_job.token(job, uses=1))
    task = uploader.task()
    junk = os.urandom(4096)
    assert uploader.upload(task, junk, sha256="0" * 64) == grpc.StatusCode.INVALID_ARGUMENT
    assert uploader.upload(task, junk, task_id="task-not-mine") == grpc.StatusCode.FAILED_PRECONDITION
    assert uploader.upload(task, junk, total_size=1 << 30) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A header naming another job is counted against the caller's own: no series for a made-up id.
    assert uploader.upload(task, junk, job_id="job-madeup") == grpc.StatusCode.FAILED_PRECONDITION
    uploader.channel.close()
    samples = scrape(live_job.metrics_url)
    assert {dict(labels)["reason"]: n for (name, labels), n in samples.items()
            if name == "fedtune_updates_rejected_total" and dict(labels)["job"] == job} == {
        "invalid_argument": 1, "failed_precondition": 2, "resource_exhausted": 1}
    assert not [k for k in samples if ("job", "job-madeup") in k[1]]
    assert value(samples, "fedtune_updates_accepted_total", job=job) == 0
    assert value(samples, "fedtune_bytes_up_total", job=job) == 0
    assert value(samples, "fedtune_clients_enrolled", job=job) == 1
    assert value(samples, "fedtune_rounds_opened_total", job=job) == 1


def test_ctrl_c_stops_watching_not_the_job(live_job: LiveJob) -> None:
    job = live_job.create_job(make_spec(rounds=1, clients=1))
    log = live_job.root / "watch-interrupted.log"
    watch = spawn("job", "status", job, "--watch", "--interval", "0.3", "--state-dir", str(live_job.state_dir),
                  log=log)
    try:
        wait_until(lambda: "waiting for clients to join" in log.read_text(errors="replace"), timeout=60,
                   what="the first frame")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=20) == 130
    finally:
        if watch.poll() is None:
            watch.kill()
    assert log.read_text().rstrip().endswith("fedtune: interrupted")
    status = live_job.admin("GetJob", pb.GetJobRequest(job_id=job))
    assert status.state == "running"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_ray_mode_metrics_cover_engines_in_actors_and_the_queue(tmp_path: Path, fed_data) -> None:  # type: ignore[no-untyped-def]
    """Engines run in Ray actors: their rounds, durations and epsilon still reach the endpoint (read
    from the shared state), and the scheduler's queue is exported."""
    pytest.importorskip("ray")
    clients, eval_file = fed_data
    state_dir = tmp_path / "coord"
    port = _free_port()
    coord = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                  "--metrics-port", str(port), log=tmp_path / "coordinator.log",
                  env={"RAY_USAGE_STATS_ENABLED": "0"})
    agent = None
    try:
        address = wait_for_coordinator(state_dir, coord, INSECURE, timeout=240)
        live = LiveJob(state_dir, tmp_path, address, "", f"http://127.0.0.1:{port}/metrics")
        resources = "resources: {cpus: %s}\n"
        big = live.create_job(make_spec(eval_file, rounds=1, clients=1) + resources % 64)
        small = live.create_job(make_spec(eval_file, rounds=1, clients=1, steps=2)
                                + resources % 0.25 + "privacy: {clip_norm: 1.0, noise_multiplier: 0.8}\n")
        queued = scrape(live.metrics_url)
        assert value(queued, "fedtune_queue_length") == 1
        assert value(queued, "fedtune_queue_position", job=big) == 1
        assert value(queued, "fedtune_queue_position", job=small) == 0
        agent = spawn("client", "run", "--coordinator", address, "--token", live.token(small, uses=1), "--data",
                      str(clients[0]), "--state-dir", str(tmp_path / "agent"), "--no-progress", "--insecure",
                      log=tmp_path / "agent.log")
        assert agent.wait(timeout=300) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        done = scrape(live.metrics_url)
        assert value(done, "fedtune_rounds_opened_total", job=small) == 1
        assert value(done, "fedtune_rounds_published_total", job=small) == 1
        assert value(done, "fedtune_round_duration_seconds_count", job=small) == 1
        assert value(done, "fedtune_phase_duration_seconds_count", job=small, phase="evaluate") == 1
        assert value(done, "fedtune_updates_accepted_total", job=small) == 1
        assert value(done, "fedtune_clients_enrolled", job=small) == 1
        assert (value(done, "fedtune_dp_epsilon", job=small) or 0) > 0
        assert value(done, "fedtune_queue_length") == 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        # SIGTERM: the coordinator stops the local Ray it started (other Rays on the machine are left alone).
        coord.terminate()
        try:
            coord.wait(timeout=90)
        except subprocess.TimeoutExpired:
            coord.kill()


def test_every_metric_the_grafana_dashboard_queries_is_served(live_job: LiveJob) -> None:
    dashboard = REPO / "deploy" / "grafana" / "fedtune.json"
    if not dashboard.exists():
        pytest.skip("no deploy/grafana/fedtune.json in this tree")
    queried = set(re.findall(r"\bfedtune_[a-z_]+", dashboard.read_text()))
    with urllib.request.urlopen(live_job.metrics_url, timeout=10) as reply:
        # Every family is declared, also those with no sample yet (SecAgg dropouts of a job without SecAgg).
        families = set(re.findall(r"(?m)^# TYPE (fedtune_\w+) ", reply.read().decode()))
    missing = {q for q in queried if q not in families and re.sub(r"_(bucket|sum|count)$", "", q) not in families}
    assert queried and not missing, f"the dashboard queries metrics nobody serves: {sorted(missing)}"


def test_a_restarted_coordinator_reports_the_rounds_and_clients_at_once(live_job: LiveJob, tmp_path: Path) -> None:
    # A restart is a new process on the same durable state: here, on a copy of it (the module's
    # coordinator keeps running for the other tests), taken with SQLite's backup API.
    state_dir = tmp_path / "coord"
    shutil.copytree(live_job.state_dir, state_dir, ignore=shutil.ignore_patterns("state.db*", "coordinator.*"))
    with sqlite3.connect(live_job.state_dir / "state.db") as src, sqlite3.connect(state_dir / "state.db") as dst:
        src.backup(dst)
    port = _free_port()
    again = spawn("coordinator", "start", "--state-dir", str(state_dir), "--port", "0", "--insecure",
                  "--in-process", "--metrics-port", str(port), log=tmp_path / "coordinator.log")
    try:
        wait_for_coordinator(state_dir, again, INSECURE, timeout=120)
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        again.terminate()
        again.wait(timeout=60)
    job, before = live_job.job, live_job.final
    for name in ("fedtune_rounds_opened_total", "fedtune_rounds_published_total", "fedtune_clients_enrolled",
                 "fedtune_round_duration_seconds_count", "fedtune_round_duration_seconds_sum", "fedtune_dp_epsilon"):
        assert value(samples, name, job=job) == value(before, name, job=job), name
    # Traffic is counted by the process as it passes: a new process starts from zero.
    assert value(samples, "fedtune_updates_accepted_total", job=job) == 0


def test_secagg_dropouts_and_phase_timings_are_read_from_stored_rounds() -> None:
    from fedtune.coordinator.metrics_export import _Histogram, round_phases, secagg_dropouts
    from fedtune.coordinator.state import Round

    def stored(rnd: int, state: str, metrics: dict[str, float]) -> Round:
        return Round("job-x", rnd, state, 0.0, 0.0, ("a", "b", "c", "d"), "g", None, metrics, None)

    rounds = [stored(1, "published", {"cohort": 4, "contributors": 3}),
              stored(2, "aggregated", {"cohort": 4, "contributors": 2}),
              stored(3, "open", {})]  # no aggregate yet: its missing inputs are not dropouts (yet)
    assert secagg_dropouts(rounds) == 3
    timings = {"aggregated_seconds": 7.0, "aggregate_seconds": 1.5, "eval_seconds": 2.0, "publish_seconds": 0.25}
    assert dict(round_phases(timings)) == {"collect": 5.5, "aggregate": 1.5, "evaluate": 2.0, "publish": 0.25}
    assert dict(round_phases({"aggregated_seconds": 3.0, "aggregate_seconds": 1.0})) == {"collect": 2.0,
                                                                                         "aggregate": 1.0}
    hist = _Histogram()
    for seconds in (0.1, 0.2, 7.0, 9000.0):
        hist.observe(seconds)
    buckets = dict(hist.buckets())
    # Cumulative, upper bounds inclusive, the last one everything.
    assert (buckets["0.1"], buckets["0.25"], buckets["5.0"], buckets["10.0"], buckets["7200.0"], buckets["+Inf"]) == (
        1, 2, 2, 3, 3, 4)
    assert hist.sum == pytest.approx(9007.3)
