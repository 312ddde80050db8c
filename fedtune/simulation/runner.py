"""Runs a job with N virtual clients on Ray, through the same code path as real agents.

A real coordinator serves on loopback; each virtual client is a client agent (same training,
packing, envelope and, when the job says so, SecAgg+ code) run as a Ray task only while it is in
a round's cohort, then it goes dormant: a dormant client costs a state dir, not a process.
Concurrency is bounded by the resources each task asks for.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.channel import INSECURE
from fedtune.coordinator.server import start
from fedtune.data import write_synthetic_federation
from fedtune.errors import FedtuneError, InvalidInput
from fedtune.report import HEADER, round_row
from fedtune.simulation.partition import partition, write_partitions
from fedtune.spec import parse_spec, spec_to_yaml

log = logging.getLogger(__name__)

# A virtual client that has had nothing to do for this long gives its slot back.
IDLE_SECONDS = 30.0
SIMULATION_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class ClientResources:
    """What each virtual client's Ray task reserves."""

    cpus: float = 0.25
    gpus: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ClientResources:
        """``cpus=0.5,gpus=0`` -> ClientResources."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("cpus", "gpus"):
                raise InvalidInput(f"--client-resources: unknown resource {key!r} (use cpus=..,gpus=..)")
            try:
                values[key] = float(value)
            except ValueError:
                raise InvalidInput(f"--client-resources: {key} must be a number, got {value!r}") from None
            if values[key] < 0:
                raise InvalidInput(f"--client-resources: {key} must not be negative")
        return cls(**values)


def _init_ray(ray_address: str | None, scratch: Path) -> Any:
    """Ray for the simulation: the cluster at ``ray_address`` or a local one, token auth handled."""
    from fedtune.cluster.connect import connect

    return connect(ray_address, scratch)


def simulate(config: Path, n_clients: int, scheme: str = "iid", data: Path | None = None,
             resources: ClientResources | None = None, out: Path | None = None,
             ray_address: str | None = None, batch_clients: int = 1) -> list[dict[str, Any]]:
    """Runs the job in ``config`` with ``n_clients`` virtual clients; prints the per-round table.

    Args:
        batch_clients: Cohort members per Ray task; above 1 their adapters train in one pass of the
            base (:mod:`fedtune.simulation.batched`), and ``resources`` is what each such task reserves.

    Returns:
        The published rounds' metrics.

    Raises:
        InvalidInput: A bad setting (e.g. ``batch_clients`` below 1) or more clients than the data can feed.
    """
    if batch_clients < 1:
        raise InvalidInput(f"--batch-clients must be at least 1, got {batch_clients}")
    resources = resources or ClientResources()
    # The per-round table is the output; the coordinator's per-update log lines would bury it.
    logging.getLogger("fedtune.coordinator").setLevel(logging.WARNING)
    spec = parse_spec(config.read_text(), base_dir=config.resolve().parent)
    root = out.resolve() if out else Path(tempfile.mkdtemp(prefix="fedtune-sim-"))
    scratch = Path(tempfile.mkdtemp(prefix="ftray-", dir="/tmp"))
    try:
        if data is None:
            pool, eval_file = write_synthetic_federation(root / "pool", 5, examples_per_client=max(
                64, math.ceil(16 * n_clients / 5)))
            data = root / "pool" / "all.jsonl"
            data.write_text("".join(p.read_text() for p in pool))
            if not spec.eval_data:
                spec = spec.model_copy(update={"eval_data": str(eval_file)})
        files = write_partitions(partition(data, n_clients, scheme, data_spec=spec.data), root / "clients-data")
        # Imported once the settings and data are known to be good: torch and peft take seconds.
        from fedtune.client.agent import ClientAgent

        # Ray first: an unreachable --ray-address fails before any job is created.
        # Keep a worker per concurrent virtual client alive between rounds: by default Ray keeps only
        # one per CPU, and each fresh worker spends seconds importing torch before it trains.
        os.environ.setdefault("RAY_num_workers_soft_limit",
                              str(max(os.cpu_count() or 1, math.ceil((os.cpu_count() or 1) / max(resources.cpus, 0.01)))))
        ray = _init_ray(ray_address, scratch)
        running = start(root / "coordinator", "127.0.0.1", 0, insecure=True)
        try:
            co = running.coordinator
            job = co.create_job(spec_to_yaml(spec)).job_id
            ids = []
            for i, path in enumerate(files):
                token, _, _ = co.state.add_token(job, 1, 3600)
                agent = ClientAgent(running.address, token, path, root / "clients" / f"v{i}", INSECURE,
                                    device="cpu", name=f"v{i}", progress=False)
                ids.append(agent.enroll())
            print(f"simulation: {n_clients} virtual clients ({scheme}), job {job}, coordinator {running.address}",
                  flush=True)
            return _drive(ray, running, job, ids, files, root, resources, batch_clients)
        finally:
            running.stop(grace=1.0)
            ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if out is None:
            shutil.rmtree(root, ignore_errors=True)


def _drive(ray: Any, running: Any, job: str, ids: list[str], files: list[Path], root: Path,
           resources: ClientResources, batch_clients: int) -> list[dict[str, Any]]:
    from fedtune.simulation.batched import run_group

    co = running.coordinator
    # One task per group of up to batch_clients members (a group of one trains with its agent's own loop).
    remote_group = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=0)(run_group)
    index = {cid: i for i, cid in enumerate(ids)}
    tasks: dict[Any, list[str]] = {}
    launched: set[tuple[str, int, int]] = set()
    shown, started = 0, time.time()
    passes: list[int] = []
    asynchronous = co.spec(job).aggregation.mode == "async"
    print(HEADER, flush=True)
    while True:
        # Virtual clients are always available: the engine samples its cohort among all of them.
        for cid in ids:
            co.presence.touch(cid)
        state = co.state.job(job)
        for r in co.state.rounds(job):
            if r.state == "published" and r.round > shown:
                print(round_row(r.round, r.metrics), flush=True)
                shown = r.round
        if state.state in ("finished", "failed", "cancelled"):
            if state.state != "finished":
                raise FedtuneError(f"job {job} {state.state}: {state.message}")
            if batch_clients > 1:
                print(f"batched training: {len(passes)} shared passes trained {sum(passes)} client updates "
                      f"(up to {batch_clients} per pass)", flush=True)
            return [r.metrics for r in co.state.rounds(job)]
        rnd = co.state.find_round(job, state.current_round)
        if rnd is not None and rnd.state == "open":
            sec = co.state.secagg_round(job, rnd.round)
            attempt = sec.attempt if sec else 0
            busy = {cid for members in tasks.values() for cid in members}
            # Async rounds have no cohort: up to clients_per_round idle virtual clients train at once,
            # each on the newest version when it asks.
            pool = ids if asynchronous else rnd.cohort
            due = [cid for cid in pool if (cid, rnd.round, attempt) not in launched and cid not in busy
                   and not co.state.has_update(job, rnd.round, cid)]
            if asynchronous:
                random.Random(rnd.round).shuffle(due)
                due = due[: max(0, co.spec(job).clients_per_round - len(busy))]
            for first in range(0, len(due), batch_clients):
                group = due[first : first + batch_clients]
                members = [(str(files[index[c]]), str(root / "clients" / f"v{index[c]}")) for c in group]
                tasks[remote_group.remote(running.address, members, IDLE_SECONDS)] = group
                launched.update((c, rnd.round, attempt) for c in group)
        if tasks:
            done, _ = ray.wait(list(tasks), num_returns=len(tasks), timeout=0.5)
            for ref in done:
                group = tasks.pop(ref)
                try:
                    passes.extend(ray.get(ref, timeout=10)["passes"])
                except Exception as e:  # noqa: BLE001 - a failed virtual client is a dropout, as a real one
                    log.warning("virtual client(s) %s failed: %s", ", ".join(group), e)
        else:
            time.sleep(0.3)
        if time.time() - started > SIMULATION_TIMEOUT_SECONDS:
            raise FedtuneError(f"simulation did not finish within {SIMULATION_TIMEOUT_SECONDS:.0f}s")
