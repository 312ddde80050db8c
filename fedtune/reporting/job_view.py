"""What a JobStatus says, as plain data: where the job is, each client's progress, per-round series.

Both the live view and the HTML report read a job only through this module, so the two never
disagree about what a round's phase or a client's last loss is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

TERMINAL = ("finished", "failed", "cancelled")
# Round states whose aggregate, and so its metrics, are stored.
AGGREGATED = ("aggregated", "published")


@dataclass(frozen=True)
class ClientProgress:
    """One enrolled client, as the operator sees it."""

    client_id: str
    name: str
    connected: bool
    last_seen_unix: float
    # In the current round: uploaded, training (in the cohort, no update yet), idle (not asked), "" (no round open).
    activity: str
    rounds_contributed: int
    examples: int
    bytes_up: int
    last_train_loss: float | None
    last_eval_loss: float | None  # on its own held-out data (federated evaluation)


def metrics_of(r: Any) -> dict[str, float]:
    """The metrics of a RoundSummary, ClientUpdate or ClientEval."""
    return json.loads(r.metrics_json or "{}")


def _finite(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def current_round(status: Any) -> Any | None:
    """The RoundSummary of the job's current round, or None when it is not open yet."""
    for r in status.history:
        if r.round == status.current_round:
            return r
    return None


def phase(status: Any) -> str:
    """Where the job is, in a few words: queued, waiting for a cohort, training (k/n in), aggregating..."""
    if status.state in TERMINAL:
        return status.state
    if status.state == "queued":
        sched = status.scheduling
        return f"queued, place {sched.queue_position}: {sched.reason}" if sched.queue_position else "queued"
    rnd = current_round(status)
    if rnd is None:
        return "waiting for clients to join" if not status.clients else "waiting for a cohort"
    if rnd.state == "open":
        return f"training: {len(rnd.client_updates)}/{len(rnd.cohort_client_ids) or rnd.cohort} updates in"
    if rnd.state == "closing":
        return "aggregating"
    if rnd.state == "aggregated":
        return "evaluating and publishing"
    return rnd.state


def client_progress(status: Any) -> list[ClientProgress]:
    """Every enrolled client, in enrollment order, with what it did so far."""
    rnd = current_round(status)
    open_round = rnd is not None and rnd.state == "open"
    uploaded = {u.client_id for u in rnd.client_updates} if rnd is not None else set()
    cohort = set(rnd.cohort_client_ids) if rnd is not None else set()
    out = []
    for c in status.clients:
        rounds = examples = nbytes = 0
        train = held_out = None
        for r in status.history:
            for u in r.client_updates:
                if u.client_id == c.client_id:
                    rounds += 1
                    examples += u.num_examples
                    nbytes += u.bytes
                    loss = _finite(metrics_of(u).get("train_loss"))
                    train = loss if loss is not None else train
            for e in r.client_evals:
                if e.client_id == c.client_id and e.num_examples:
                    loss = _finite(metrics_of(e).get("eval_loss"))
                    held_out = loss if loss is not None else held_out
        if not open_round:
            activity = ""
        elif c.client_id in uploaded:
            activity = "uploaded"
        elif c.client_id in cohort:
            activity = "training"
        else:
            activity = "idle"
        out.append(ClientProgress(c.client_id, c.name, c.connected, c.last_seen_unix, activity, rounds, examples,
                                  nbytes, train, held_out))
    return out


def round_series(status: Any, key: str) -> list[tuple[int, float]]:
    """(round, value) of one aggregate metric over the rounds that have it."""
    points = []
    for r in status.history:
        value = _finite(metrics_of(r).get(key)) if r.state in AGGREGATED else None
        if value is not None:
            points.append((r.round, value))
    return points


def client_train_losses(status: Any) -> dict[str, list[tuple[int, float]]]:
    """Each client's own train loss per round it contributed to, keyed by its display name."""
    names = {c.client_id: (c.name or c.client_id) for c in status.clients}
    series: dict[str, list[tuple[int, float]]] = {}
    for r in status.history:
        for u in r.client_updates:
            loss = _finite(metrics_of(u).get("train_loss"))
            if loss is not None:
                series.setdefault(names.get(u.client_id, u.client_id), []).append((r.round, loss))
    return series


def participation(status: Any) -> list[tuple[int, int, int]]:
    """(round, cohort size, contributors) of every round opened so far."""
    return [(r.round, len(r.cohort_client_ids) or r.cohort, len(r.client_updates) or r.contributors)
            for r in status.history]


def traffic(status: Any) -> list[tuple[int, int, int]]:
    """(round, bytes up, bytes down) of every round opened so far (up: its accepted updates)."""
    return [(r.round, r.bytes_up or sum(u.bytes for u in r.client_updates), r.bytes_down) for r in status.history]


def base_eval_loss(status: Any) -> float | None:
    """The bare base model's eval loss (the zero-shot reference), when the job has eval data."""
    return _finite(json.loads(status.base_metrics_json or "{}").get("eval_loss"))
