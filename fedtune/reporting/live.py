"""`fedtune job status JOB --watch`: a job's round, phase, cohort and clients, redrawn until it ends.

On a terminal the view is redrawn in place (rich ``Live``); piped into a file or a CI log, a new
frame is printed only when something in it changed, so the log reads as the job's history.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedtune.errors import Unavailable
from fedtune.report import client_eval_lines, history_lines, human_bytes
from fedtune.reporting.job_view import TERMINAL, client_progress, phase

# Rounds shown in the table; older ones scroll off (`job report` has them all).
SHOWN_ROUNDS = 8
# Width of frames printed to a file or a pipe (a terminal's own width is used on a terminal).
LOG_WIDTH = 120
# Client rows shown (this round's cohort first); `job status --format json` and `job report` list all.
SHOWN_CLIENTS = 20
# Who is shown first when not every client fits.
_ACTIVITY_ORDER = {"training": 0, "uploaded": 1, "idle": 2, "": 3}


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 5400 else f"{seconds / 3600:.1f} h ago"


def clients_table(status: Any, now: float) -> Table:
    """One row per enrolled client: connection, what it does this round, its losses and traffic."""
    everyone = client_progress(status)
    clients = sorted(everyone, key=lambda c: _ACTIVITY_ORDER.get(c.activity, 3))[:SHOWN_CLIENTS]
    # Held-out losses exist only where clients run federated evaluation.
    held_out = any(c.last_eval_loss is not None for c in clients)
    hidden = len(everyone) - len(clients)
    table = Table(title="clients", title_justify="left", expand=False,
                  caption=f"and {hidden} more (job status --format json lists them all)" if hidden else None,
                  caption_justify="left")
    for name in ("client", "name", "connection", "this round"):
        table.add_column(name, no_wrap=True)
    for name in ("rounds", "examples", "train loss", *(("held-out loss",) if held_out else ()), "sent"):
        table.add_column(name, justify="right", no_wrap=True)
    for c in clients:
        seen = "connected" if c.connected else (
            f"away, seen {_ago(now - c.last_seen_unix)}" if c.last_seen_unix else "away")
        # Names come from clients: Text keeps a "[" in one from being read as rich markup.
        table.add_row(Text(c.client_id), Text(c.name), seen, c.activity or "-", str(c.rounds_contributed),
                      str(c.examples),
                      _loss(c.last_train_loss), *((_loss(c.last_eval_loss),) if held_out else ()),
                      human_bytes(c.bytes_up))
    return table


def render(status: Any, now: float, note: str = "") -> RenderableType:
    """One frame of the view."""
    head = Text()
    head.append(f"{status.state}", style="bold")
    head.append(f"  round {status.current_round}/{status.rounds}")
    if status.state not in TERMINAL:
        head.append(f"  {phase(status)}", style="cyan")
    live = sum(c.connected for c in status.clients)
    head.append(f"\nclients: {len(status.clients)} enrolled, {live} connected")
    if status.message:
        head.append(f"\nmessage: {status.message}")
    parts: list[RenderableType] = [head]
    if status.clients:
        parts.append(clients_table(status, now))
    if status.history:
        lines = history_lines(status)
        parts.append(Text("\n".join([lines[0], *lines[1:][-SHOWN_ROUNDS:]])))
        evals = client_eval_lines(status)
        if evals:
            parts.append(Text("\n".join(evals[-(SHOWN_ROUNDS * 3):])))
    if note:
        parts.append(Text(note, style="yellow"))
    title = Text(f"job {status.job_id} ({status.name})")
    footer = f"{datetime.fromtimestamp(now).strftime('%H:%M:%S')}; Ctrl-C stops watching, not the job"
    return Panel(Group(*parts), title=title, title_align="left", subtitle=footer, subtitle_align="right")


def fingerprint(status: Any) -> tuple[object, ...]:
    """What a printed frame shows, without the clock: a new frame is printed when it moves."""
    return (status.state, status.current_round, status.message,
            tuple((r.round, r.state, len(r.client_updates), len(r.cohort_client_ids), len(r.client_evals))
                  for r in status.history),
            tuple((c.client_id, c.connected) for c in status.clients))


def watch(fetch: Callable[[], Any], interval: float, console: Console | None = None) -> Any:
    """Shows the job ``fetch`` returns every ``interval`` seconds until it ends; returns its last status.

    The first fetch's errors are raised; later, a coordinator that cannot be reached (a restart) is
    shown in the frame and asked again at the next tick.
    """
    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=LOG_WIDTH, no_color=True, highlight=False)
    status = fetch()
    if console.is_terminal:
        with Live(render(status, time.time()), console=console, auto_refresh=False) as view:
            while status.state not in TERMINAL:
                time.sleep(interval)
                status, note = _next(fetch, status)
                view.update(render(status, time.time(), note), refresh=True)
        return status
    shown: tuple[object, ...] | None = None
    away = False
    while True:
        if fingerprint(status) != shown:
            shown = fingerprint(status)
            console.print(render(status, time.time()))
            console.file.flush()
        if status.state in TERMINAL:
            return status
        time.sleep(interval)
        status, note = _next(fetch, status)
        if note and not away:  # once per outage, not once per look
            console.print(note)
        away = bool(note)


def _next(fetch: Callable[[], Any], last: Any) -> tuple[Any, str]:
    try:
        return fetch(), ""
    except Unavailable as e:
        return last, f"{datetime.now().strftime('%H:%M:%S')} {e}; asking again"
