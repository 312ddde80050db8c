"""Prometheus metrics of `fedtune serve` (``GET /metrics``), in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Requests for a model that does not exist are counted under this label, so that clients sending
# made-up names cannot grow the metric without bound.
UNKNOWN_MODEL = "unknown"

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The server's counters, gauges and histograms.

    Batch sizes are the engine's, through :meth:`engine_hook`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fedtune_serve_requests", "Requests answered, by model id and HTTP status.",
                                ["model", "status"], registry=self.registry)
        self.tokens = Counter("fedtune_serve_tokens", "Tokens read (prompt) and generated (completion).",
                              ["kind"], registry=self.registry)
        self.batch_size = Histogram("fedtune_serve_batch_size", "Sequences in each forward pass of the base.",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.adapters_resident = Gauge("fedtune_serve_adapters_resident", "Adapters loaded in the engine.",
                                       registry=self.registry)
        self.time_to_first_token = Histogram(
            "fedtune_serve_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
            buckets=_TTFT_BUCKETS, registry=self.registry)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind=kind)

    def request(self, model: str, status: int) -> None:
        """Counts one answered request."""
        self.requests.labels(model=model, status=str(status)).inc()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Counts a request's tokens."""
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)

    def engine_hook(self, name: str, value: float) -> None:
        """The engine's ``metrics_hook`` (called from its decode thread): each forward pass's batch size.

        Time to first token is measured by the API from a request's arrival (adapter loading and
        queueing included, what a client waits), not from the engine's ``ttft_seconds``.
        """
        if name == "batch_size":
            self.batch_size.observe(value)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
