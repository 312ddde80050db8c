"""Runs a job with N virtual clients on Ray, through the same code path as real agents.

A real coordinator serves on loopback; each virtual client is a client agent (same training,
packing, envelope and, when the job says so, SecAgg+ code) run only while it is in a round's
cohort, then it goes dormant: a dormant client costs a state dir, not a process. The agents run on
a pool of long-lived Ray actors (:mod:`fedtune.simulation.pool`) that keep the imports and the
loaded model from one virtual client to the next; the pool's size follows the cluster's resources
and ``--client-resources`` (or ``--workers``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedtune.client.channel import INSECURE
from fedtune.coordinator.server import start
from fedtune.data import write_synthetic_federation
from fedtune.errors import FedtuneError, InvalidInput, StateConflict
from fedtune.report import HEADER, round_row
from fedtune.simulation.partition import partition, write_partitions
from fedtune.simulation.schedule import ClientResources, pool_size
from fedtune.spec import parse_spec, spec_to_yaml

log = logging.getLogger(__name__)

__all__ = ["ClientResources", "simulate"]

# A virtual client that has had nothing to do for this long gives its worker back.
IDLE_SECONDS = 30.0
# How often the driver marks every virtual client as present (well inside the presence window).
TOUCH_SECONDS = 1.0
# Longest the driver waits for a worker while groups run before it looks at the job again: a round
# that opens wakes the driver only when it is not waiting on the workers.
RUNNING_WAIT_SECONDS = 0.05
# Longest wait for the engine with nothing running (a fallback: the engine's changes wake the driver).
IDLE_WAIT_SECONDS = 0.5
SIMULATION_TIMEOUT_SECONDS = 3600.0
# Library loggers whose per-client INFO lines (joins, tasks, accepted updates) the round table replaces.
_CHATTY = ("fedtune.coordinator", "fedtune.client", "fedtune.cluster", "fedtune.simulation.batched")


def _init_ray(ray_address: str | None, scratch: Path) -> Any:
    """Ray for the simulation: the cluster at ``ray_address`` or a local one, token auth handled."""
    from fedtune.cluster.connect import connect

    return connect(ray_address, scratch)


def _coordinator_host(ray: Any, ray_address: str | None, coordinator_host: str | None) -> tuple[str, str]:
    """(where the simulation's coordinator listens, the host its virtual clients dial).

    On a local Ray every worker is on this machine: loopback. On a cluster, workers on other nodes
    must reach it: ``--coordinator-host``, else this node's IP as Ray reports it (what the
    cluster's nodes already use to reach each other). A wildcard bind is dialled at that IP.
    """
    from fedtune.cluster.connect import node_ip

    if coordinator_host is None:
        host = node_ip(ray) if ray_address else "127.0.0.1"
        return host, host
    if coordinator_host in ("0.0.0.0", "::", "[::]"):
        return coordinator_host, node_ip(ray)
    return coordinator_host, coordinator_host


def _check_listenable(host: str) -> None:
    """Refuses a ``--coordinator-host`` this machine cannot listen on, before Ray or torch start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((host.strip("[]"), 0))
    except OSError as e:
        raise InvalidInput(f"--coordinator-host {host}: cannot listen there ({e.strerror or e}); pass an address "
                           "of this machine that the Ray cluster's workers can reach") from None


def simulate(config: Path, n_clients: int, scheme: str = "iid", data: Path | None = None,
             resources: ClientResources | None = None, out: Path | None = None,
             ray_address: str | None = None, batch_clients: int = 1,
             workers: int | None = None, coordinator_host: str | None = None) -> list[dict[str, Any]]:
    """Runs the job in ``config`` with ``n_clients`` virtual clients; prints the per-round table.

    Ends by printing where the last published adapter is and how to load it.

    Args:
        resources: What each pool worker reserves; the pool holds as many as the cluster fits.
        batch_clients: Cohort members a worker runs at once; above 1 their adapters train in one
            pass of the base (:mod:`fedtune.simulation.batched`).
        workers: Pool size instead of what the resources allow (never more than can be busy at once).
        coordinator_host: Where the simulation's coordinator listens (default: loopback on a local
            Ray, this node's IP as Ray reports it with ``ray_address``), reachable from every worker.

    Returns:
        The published rounds' metrics.

    Raises:
        InvalidInput: A bad setting (e.g. ``batch_clients`` below 1) or more clients than the data can feed.
    """
    if batch_clients < 1:
        raise InvalidInput(f"--batch-clients must be at least 1, got {batch_clients}")
    if workers is not None and workers < 1:
        raise InvalidInput(f"--workers must be at least 1, got {workers}")
    if coordinator_host is not None:
        _check_listenable(coordinator_host)
    resources = resources or ClientResources()
    # The per-round table is the output; per-client and per-update log lines would bury it.
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    worker_level = logging.DEBUG if debug else logging.WARNING
    if not debug:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    spec = parse_spec(config.read_text(), base_dir=config.resolve().parent)
    root = out.resolve() if out else Path(tempfile.mkdtemp(prefix="fedtune-sim-"))
    scratch = Path(tempfile.mkdtemp(prefix="ftray-", dir="/tmp"))
    try:
        if data is None:
            pool_files, eval_file = write_synthetic_federation(root / "pool", 5, examples_per_client=max(
                64, math.ceil(16 * n_clients / 5)))
            data = root / "pool" / "all.jsonl"
            data.write_text("".join(p.read_text() for p in pool_files))
            if not spec.eval_data:
                spec = spec.model_copy(update={"eval_data": str(eval_file)})
        files = write_partitions(partition(data, n_clients, scheme, data_spec=spec.data), root / "clients-data")
        # Imported once the settings and data are known to be good: torch and peft take seconds.
        from fedtune.client.agent import ClientAgent
        from fedtune.simulation.pool import WorkerPool

        # Ray first: an unreachable --ray-address fails before any job is created. The pool's
        # workers then import torch while the coordinator starts and the clients enroll.
        ray = _init_ray(ray_address, scratch)
        pool = None
        try:
            cluster = ray.cluster_resources()
            in_flight = math.ceil(min(n_clients, spec.clients_per_round) / batch_clients)
            size = pool_size(cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), resources, in_flight, workers)
            # All workers warm up at once (the steadiest rounds); FEDTUNE_SIM_WARM_AT_ONCE=N starts N and
            # the rest one at a time while clients wait (a shorter first round on a small machine).
            warm = int(os.environ.get("FEDTUNE_SIM_WARM_AT_ONCE", "0")) or size
            pool = WorkerPool(ray, size, resources, batch_clients, worker_level, warm_at_once=max(1, warm))
            bind, dial = _coordinator_host(ray, ray_address, coordinator_host)
            try:
                running = start(root / "coordinator", bind, 0, insecure=True)
            except StateConflict as e:
                raise InvalidInput(f"--coordinator-host {bind}: cannot listen there ({e}); pass an address of this "
                                   "machine that the Ray cluster's workers can reach") from None
            address = f"{dial}:{running.port}"
            try:
                co = running.coordinator
                job = co.create_job(spec_to_yaml(spec)).job_id
                ids = []
                for i, path in enumerate(files):
                    token, _, _ = co.state.add_token(job, 1, 3600)
                    agent = ClientAgent(address, token, path, root / "clients" / f"v{i}", INSECURE,
                                        device="cpu", name=f"v{i}", progress=False)
                    ids.append(agent.enroll())
                each = "one virtual client" if batch_clients == 1 else f"up to {batch_clients} virtual clients"
                gpus = f", {resources.gpus:g} GPUs" if resources.gpus else ""
                print(f"simulation: {n_clients} virtual clients ({scheme}), job {job}, coordinator {address}; "
                      f"{size} workers ({resources.cpus:g} CPUs{gpus} each), {each} at a time on each", flush=True)
                members = {cid: (str(files[i]), str(root / "clients" / f"v{i}")) for i, cid in enumerate(ids)}
                metrics = _drive(running, address, job, ids, members, pool, batch_clients)
                # What ran where, for benchmarks and tests (the state dir is kept with --out only).
                (root / "simulation.json").write_text(json.dumps({
                    "job": job, "clients": n_clients, "workers": size, "batch_clients": batch_clients,
                    "client_resources": {"cpus": resources.cpus, "gpus": resources.gpus},
                    "runs": pool.history}, indent=1))
                _print_adapter(co.adapters_root, job, out is not None, root)
                return metrics
            finally:
                running.stop(grace=1.0)
        finally:
            if pool is not None:
                pool.stop()
            ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if out is None:
            shutil.rmtree(root, ignore_errors=True)


def _drive(running: Any, address: str, job: str, ids: list[str], members: dict[str, tuple[str, str]], pool: Any,
           batch_clients: int) -> list[dict[str, Any]]:
    """Feeds each round's cohort to the worker pool and prints the table, until the job ends."""
    co = running.coordinator
    launched: set[tuple[str, int, int]] = set()
    shown, started = 0, time.time()
    passes: list[int] = []
    asynchronous = co.spec(job).aggregation.mode == "async"
    # The engine says when a round opens, closes or is published; the driver looks at the job then
    # (and after a group ends, or at the latest every IDLE_WAIT_SECONDS) instead of polling the state.
    changed = threading.Event()
    engine = co.engines.get(job)
    if engine is not None:
        engine.on_change(changed.set)
    touched, looked = 0.0, 0.0
    print(HEADER, flush=True)
    while True:
        now = time.monotonic()
        if now - touched >= TOUCH_SECONDS:
            # Virtual clients are always available: the engine samples its cohort among all of them.
            for cid in ids:
                co.presence.touch(cid)
            touched = now
        if not (changed.is_set() or now - looked >= IDLE_WAIT_SECONDS):
            if _run_pool(pool, address, members, passes, changed) and asynchronous:
                changed.set()  # a client came back: an async round may start another in its place
            continue
        changed.clear()
        looked = now
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
            print(f"workers: {pool.runs} virtual-client runs in {len(pool.pids)} worker processes "
                  f"(pool of {pool.size})", flush=True)
            return [r.metrics for r in co.state.rounds(job)]
        rnd = co.state.find_round(job, state.current_round)
        if rnd is not None and rnd.state == "open":
            sec = co.state.secagg_round(job, rnd.round)
            attempt = sec.attempt if sec else 0
            busy = pool.busy()
            # Async rounds have no cohort: up to clients_per_round idle virtual clients train at once,
            # each on the newest version when it asks.
            wanted = ids if asynchronous else rnd.cohort
            due = [cid for cid in wanted if (cid, rnd.round, attempt) not in launched and cid not in busy
                   and not co.state.has_update(job, rnd.round, cid)]
            if asynchronous:
                random.Random(rnd.round).shuffle(due)
                due = due[: max(0, co.spec(job).clients_per_round - len(busy))]
            pool.submit(due)
            launched.update((c, rnd.round, attempt) for c in due)
        if _run_pool(pool, address, members, passes, changed) and asynchronous:
            changed.set()
        if time.time() - started > SIMULATION_TIMEOUT_SECONDS:
            raise FedtuneError(f"simulation did not finish within {SIMULATION_TIMEOUT_SECONDS:.0f}s")


def _run_pool(pool: Any, address: str, members: dict[str, tuple[str, str]], passes: list[int],
              changed: threading.Event) -> bool:
    """Hands waiting clients to free workers, then waits briefly for a group to end (or, with none
    running or warming up, for the engine's next change); True when some group ended."""
    pool.start(address, members, IDLE_SECONDS)
    if not pool.pending():
        changed.wait(IDLE_WAIT_SECONDS)
        return False
    # While groups run, wait on them (a freed worker takes the next client at once), briefly enough to
    # see a round the engine opens meanwhile; clients waiting for warming workers wait on those.
    ended = pool.collect(timeout=RUNNING_WAIT_SECONDS if pool.running() else IDLE_WAIT_SECONDS)
    for group, result in ended:
        if isinstance(result, Exception):
            # A failed virtual client is a dropout, as a real one would be.
            log.warning("virtual client(s) %s failed: %s", ", ".join(group), result)
        else:
            passes.extend(result["passes"])
    return bool(ended)


def _print_adapter(adapters_root: Path, job: str, kept: bool, root: Path) -> None:
    """Where the last published round's adapter is, and how to load or pull it."""
    rounds = sorted((p for p in (adapters_root / job).glob("round-*") if (p / "fedtune.json").is_file()),
                    key=lambda p: int(p.name.removeprefix("round-")))
    if not rounds:
        print(f"job {job} published no adapter", flush=True)
        return
    last = rounds[-1]
    if not kept:
        print(f"published adapter: {last.name} of job {job}, in a temporary dir now removed; pass --out DIR to "
              "keep it", flush=True)
        return
    base = json.loads((last / "fedtune.json").read_text()).get("base_model", "BASE")
    state_dir = root / "coordinator"
    print(f"published adapter: {last}\n"
          f"  load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"{last}\") "
          f"(BASE: {base})\n"
          f"  pull it: fedtune coordinator start --state-dir {state_dir}, then "
          f"fedtune adapters pull {job} --state-dir {state_dir} --out DIR", flush=True)
