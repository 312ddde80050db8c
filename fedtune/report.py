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


def history_lines(status: Any) -> list[str]:
    """The table of a JobStatus's rounds, header first; a round not yet published shows its state."""
    lines = [HEADER]
    for r in status.history:
        metrics = json.loads(r.metrics_json or "{}")
        if r.state != "published":
            metrics = {"contributors": r.contributors, "cohort": r.cohort, "bytes_down": r.bytes_down}
            lines.append(round_row(r.round, metrics) + f"  ({r.state})")
        else:
            lines.append(round_row(r.round, metrics))
    return lines


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
             "metrics": json.loads(r.metrics_json or "{}"),
             "client_evals": [{"client_id": e.client_id, "num_examples": e.num_examples,
                               "metrics": json.loads(e.metrics_json or "{}")} for e in r.client_evals],
             "cohort_client_ids": list(r.cohort_client_ids),
             "client_updates": [{"client_id": u.client_id, "num_examples": u.num_examples, "bytes": u.bytes,
                                 "metrics": json.loads(u.metrics_json or "{}")} for u in r.client_updates]}
            for r in status.history
        ],
    }


def client_eval_lines(status: Any) -> list[str]:
    """Federated evaluation per round: the example-weighted aggregate, then each client's values."""
    lines = []
    for r in status.history:
        if not r.client_evals:
            continue
        agg = json.loads(r.metrics_json or "{}")
        extra = "".join(f"  {k.removeprefix('clients_eval_')} {agg[k]:.4f}" for k in sorted(agg)
                        if k.startswith("clients_eval_") and k not in ("clients_eval_examples", "clients_eval_loss"))
        lines.append(f"round {r.round} on clients' held-out data: loss {_num(agg, 'clients_eval_loss')}{extra} "
                     f"({int(agg.get('clients_evaluated', 0))} clients, {int(agg.get('clients_eval_examples', 0))} "
                     "examples)")
        for e in r.client_evals:
            m = json.loads(e.metrics_json or "{}")
            if not e.num_examples:
                lines.append(f"  {e.client_id}: no held-out data")
                continue
            rest = "".join(f"  {k.removeprefix('eval_')} {m[k]:.4f}" for k in sorted(m)
                           if k.startswith("eval_") and k != "eval_loss")
            lines.append(f"  {e.client_id}: loss {_num(m, 'eval_loss')}{rest} ({e.num_examples} examples)")
    return lines
