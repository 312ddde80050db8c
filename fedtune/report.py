"""The per-round table printed by `fedtune demo`, `fedtune job status` and simulations."""

from __future__ import annotations

import json
from typing import Any

HEADER = f"{'round':>5}  {'clients':>7}  {'train_loss':>10}  {'eval_loss':>9}  {'bytes_up':>10}  {'bytes_down':>10}  {'seconds':>7}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def round_row(rnd: int, metrics: dict[str, Any]) -> str:
    """One row of the table from a round's metrics."""
    clients = f"{int(metrics.get('contributors', 0))}/{int(metrics.get('cohort', 0))}"
    return (f"{rnd:>5}  {clients:>7}  {_num(metrics, 'train_loss'):>10}  {_num(metrics, 'eval_loss'):>9}  "
            f"{human_bytes(metrics.get('bytes_up', 0)):>10}  {human_bytes(metrics.get('bytes_down', 0)):>10}  "
            f"{metrics.get('seconds', 0.0):>7.1f}")


def status_dict(status: Any) -> dict[str, Any]:
    """A JobStatus message as plain data (what `--format json` prints)."""
    return {
        "job_id": status.job_id,
        "name": status.name,
        "state": status.state,
        "current_round": status.current_round,
        "rounds": status.rounds,
        "base_model": status.base_model,
        "base_metrics": json.loads(status.base_metrics_json or "{}"),
        "message": status.message,
        "clients": [
            {"client_id": c.client_id, "name": c.name, "connected": c.connected, "last_seen": c.last_seen_unix}
            for c in status.clients
        ],
        "history": [
            {"round": r.round, "state": r.state, "cohort": r.cohort, "contributors": r.contributors,
             "metrics": json.loads(r.metrics_json or "{}")}
            for r in status.history
        ],
    }
