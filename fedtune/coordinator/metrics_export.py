"""The coordinator's Prometheus endpoint: `fedtune coordinator start --metrics-port PORT`.

Two sources feed it, read when Prometheus scrapes:

- What passes through the client API (updates accepted and refused, bytes up and down) is counted
  as it happens by the client servicer (:mod:`fedtune.coordinator.traffic`): every client call
  lands in this process, whether engines run here or in Ray actors.
- Everything else is read from the durable state at scrape time: rounds opened and published,
  round and phase durations (from each round's stored timings), SecAgg dropouts, DP epsilon, and
  the gauges (clients enrolled and connected, the queue). Engines in Ray actors write the same
  SQLite database and heartbeats land here, so this covers Ray mode, and a restarted coordinator
  reports the same totals at once.

Every series carries the job id as its ``job`` label, except ``fedtune_queue_length``. Prometheus
itself attaches a ``job`` label (the scrape job's name) to each target: scrape the coordinator with
``honor_labels: true`` so that the coordinator's ``job`` wins (otherwise it is renamed ``exported_job``).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedtune.coordinator.state import Round
from fedtune.errors import StateConflict

if TYPE_CHECKING:
    from fedtune.coordinator.service import Coordinator

log = logging.getLogger(__name__)

# Rounds last from a fraction of a second (tiny models on loopback) to hours (large models on
# slow clients); one bucket set serves rounds and their phases.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
# A round's phases and the stored timing each is read from (fedtune.coordinator.engine writes them):
# collect = opened -> aggregation starts, then aggregate, evaluate, publish.
PHASE_KEYS = (("aggregate", "aggregate_seconds"), ("evaluate", "eval_seconds"), ("publish", "publish_seconds"))
# Round states whose aggregate (and so its contributors and timings) is stored.
AGGREGATED = ("aggregated", "published")


@dataclass
class _Histogram:
    """Observations counted per bucket, handed out cumulative, as HistogramMetricFamily takes them."""

    # One slot per bound, and a last one for values above every bound (+Inf).
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        bounds = [str(b) for b in DURATION_BUCKETS] + ["+Inf"]
        return list(zip(bounds, map(float, itertools.accumulate(self.counts)), strict=True))


def round_phases(metrics: dict[str, float]) -> Iterator[tuple[str, float]]:
    """(phase, seconds) for each phase of a round whose timing is stored."""
    if "aggregated_seconds" in metrics and "aggregate_seconds" in metrics:
        yield "collect", max(0.0, metrics["aggregated_seconds"] - metrics["aggregate_seconds"])
    for phase, key in PHASE_KEYS:
        if key in metrics:
            yield phase, metrics[key]


def secagg_dropouts(rounds: Iterable[Round]) -> int:
    """Cohort members of aggregated secure rounds whose masked input never arrived."""
    return sum(max(0, int(r.metrics.get("cohort", 0)) - int(r.metrics.get("contributors", 0)))
               for r in rounds if r.state in AGGREGATED)


class CoordinatorCollector(Collector):
    """Builds every ``fedtune_*`` family from the coordinator's state and traffic counts at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.co = coordinator
        # State-derived counters never go back within a process (an abandoned SecAgg attempt deletes
        # its round until it reopens): the highest value reported so far per (metric, job).
        self._high: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the jobs, known at scrape time."""
        return []

    def _monotonic(self, name: str, job_id: str, value: float) -> float:
        with self._lock:
            value = max(value, self._high.get((name, job_id), 0.0))
            self._high[(name, job_id)] = value
            return value

    def collect(self) -> Iterator[Metric]:
        """One scrape: reads the state once per job."""
        co = self.co
        c = {name: CounterMetricFamily(f"fedtune_{name}", doc, labels=["job"]) for name, doc in (
            ("rounds_opened", "Rounds opened (reopened SecAgg attempts count once)."),
            ("rounds_published", "Rounds aggregated, evaluated and published."),
            ("updates_accepted", "Client updates validated and stored by this process."),
            ("bytes_up", "Bytes of accepted client updates received by this process."),
            ("bytes_down", "Bytes of artifacts (base, emulator, adapters) served to clients by this process."),
            ("secagg_dropouts", "Cohort members of secure rounds whose masked input never arrived."),
        )}
        rejected = CounterMetricFamily("fedtune_updates_rejected", "Client uploads refused, by the status "
                                       "they were refused with (invalid_argument, failed_precondition, ...).",
                                       labels=["job", "reason"])
        round_seconds = HistogramMetricFamily("fedtune_round_duration_seconds",
                                              "A round from opening to publication.", labels=["job"])
        phase_seconds = HistogramMetricFamily("fedtune_phase_duration_seconds", "A round's phases: collect "
                                              "(opened until aggregation starts), aggregate, evaluate, publish.",
                                              labels=["job", "phase"])
        g = {name: GaugeMetricFamily(f"fedtune_{name}", doc, labels=["job"]) for name, doc in (
            ("clients_connected", "Enrolled clients heard from within the presence window."),
            ("clients_enrolled", "Clients enrolled in the job."),
            ("queue_position", "Place of a queued job in the scheduler's line (0: not queued)."),
            ("dp_epsilon", "DP epsilon spent so far (at the job's delta), for jobs with a privacy section."),
        )}
        queued = 0
        traffic = co.traffic.snapshot()
        for job in co.state.jobs():
            jid = job.job_id
            rounds = co.state.rounds(jid)
            c["rounds_opened"].add_metric([jid], self._monotonic("opened", jid, len(rounds)))
            c["rounds_published"].add_metric([jid], sum(r.state == "published" for r in rounds))
            c["updates_accepted"].add_metric([jid], traffic.accepted.get(jid, 0))
            c["bytes_up"].add_metric([jid], traffic.bytes_up.get(jid, 0))
            c["bytes_down"].add_metric([jid], traffic.bytes_down.get(jid, 0))
            spec = co.spec(jid)
            if spec.secure_aggregation is not None:
                c["secagg_dropouts"].add_metric([jid], self._monotonic("dropouts", jid, secagg_dropouts(rounds)))
            whole = _Histogram()
            phases: dict[str, _Histogram] = {}
            for r in rounds:
                if r.state == "published" and "seconds" in r.metrics:
                    whole.observe(r.metrics["seconds"])
                if r.state in AGGREGATED:
                    for phase, seconds in round_phases(r.metrics):
                        phases.setdefault(phase, _Histogram()).observe(seconds)
            round_seconds.add_metric([jid], whole.buckets(), whole.sum)
            for phase, hist in phases.items():
                phase_seconds.add_metric([jid, phase], hist.buckets(), hist.sum)
            clients = co.state.clients(jid)
            g["clients_enrolled"].add_metric([jid], len(clients))
            g["clients_connected"].add_metric([jid], len(co.presence.live(clients)))
            position, _ = co.queue_place(jid)
            queued += position > 0
            g["queue_position"].add_metric([jid], position)
            if spec.privacy is not None:
                spent = [r.metrics["epsilon"] for r in rounds if r.state in AGGREGATED and "epsilon" in r.metrics]
                g["dp_epsilon"].add_metric([jid], spent[-1] if spent else 0.0)
        for (jid, reason), n in sorted(traffic.rejected.items()):
            rejected.add_metric([jid, reason], n)
        yield from c.values()
        yield rejected
        yield round_seconds
        yield phase_seconds
        yield from g.values()
        yield GaugeMetricFamily("fedtune_queue_length", "Jobs waiting in the scheduler's queue.", value=queued)


class MetricsServer:
    """The HTTP endpoint (``/metrics``), bound before the service starts and fed once it runs."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, registry: CollectorRegistry, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        self.host = host
        self.port: int = httpd.server_address[1]

    @classmethod
    def bind(cls, host: str, port: int) -> MetricsServer:
        """Listens on ``host:port`` (0 picks a free port); only process metrics until :meth:`attach`.

        Raises:
            StateConflict: the port is taken or the address cannot be bound.
        """
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        try:
            httpd, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            what = "address in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise StateConflict(f"cannot serve metrics on {host}:{port}: {what}; pass another --metrics-port "
                                "(0 picks a free one)") from e
        return cls(httpd, thread, registry, host)

    @property
    def url(self) -> str:
        """Where Prometheus scrapes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def attach(self, coordinator: Coordinator) -> None:
        """Starts exporting ``coordinator``'s jobs."""
        self.registry.register(CoordinatorCollector(coordinator))

    def stop(self) -> None:
        """Stops serving and frees the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
