"""`fedtune job report JOB --out DIR`: DIR/index.html, its plots in DIR/plots/, the data in DIR/status.json.

The page is static (no script, nothing fetched from the network): it opens from the disk in any
browser, and the directory can be copied or attached as it is.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fedtune import __version__
from fedtune.errors import InvalidInput
from fedtune.report import client_eval_lines, history_lines, human_bytes, status_dict
from fedtune.reporting.job_view import TERMINAL, base_eval_loss, client_progress, phase, round_series
from fedtune.reporting.plots import Plot, render_plots

INSTALL = "pip install 'fedtune[report]'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 20px auto; max-width: 1160px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.4em; }
table.summary td { padding: 1px 14px 1px 0; } table.summary td:first-child { color: #666; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
figure { margin: 0; border: 1px solid #ddd; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
figure.empty { display: flex; align-items: center; justify-content: center; min-height: 120px; color: #777; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 0.85em; }
table.clients { border-collapse: collapse; font-size: 0.9em; }
table.clients th, table.clients td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
table.clients th:nth-child(-n+2), table.clients td:nth-child(-n+2) { text-align: left; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _summary(status: Any, generated: datetime) -> str:
    evals = round_series(status, "eval_loss")
    epsilon = round_series(status, "epsilon")
    rows = [
        ("job", f"{status.job_id} ({status.name})"),
        ("state", status.state if status.state in TERMINAL else f"{status.state}: {phase(status)}"),
        ("rounds", f"{status.current_round} of {status.rounds}"),
        ("base model", status.base_model),
        ("clients enrolled", str(len(status.clients))),
        ("base model eval loss", _loss(base_eval_loss(status))),
        ("last eval loss", f"{evals[-1][1]:.4f} (round {evals[-1][0]})" if evals else "-"),
        ("DP epsilon spent", f"{epsilon[-1][1]:.3f}" if epsilon else "-"),
        ("generated", f"{generated:%Y-%m-%d %H:%M:%S} by fedtune {__version__}"),
    ]
    if status.message:
        rows.insert(2, ("message", status.message))
    return "<table class='summary'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _figure(plot: Plot, path: Path | None, base: Path) -> str:
    if path is None:
        return f"<figure class='empty' id='{plot.key}'><p>{_e(plot.title)}: {_e(plot.empty)}</p></figure>"
    src = path.relative_to(base).as_posix()
    return (f"<figure id='{plot.key}'><img src='{_e(src)}' alt='{_e(plot.title)}'>"
            f"<figcaption>{_e(plot.caption)}</figcaption></figure>")


def _clients(status: Any) -> str:
    head = ("client", "name", "rounds", "examples", "last train loss", "last held-out loss", "sent")
    rows = [(c.client_id, c.name, c.rounds_contributed, c.examples, _loss(c.last_train_loss),
             _loss(c.last_eval_loss), human_bytes(c.bytes_up)) for c in client_progress(status)]
    if not rows:
        return "<p>No client has enrolled.</p>"
    return ("<table class='clients'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows) + "</table>")


def page(status: Any, plots: list[tuple[Plot, Path | None]], base: Path, generated: datetime) -> str:
    """The report's HTML."""
    table = "\n".join(history_lines(status) + [""] + client_eval_lines(status)) if status.history else \
        "No round has opened yet."
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedtune report: {_e(status.name)} ({_e(status.job_id)})</title>
<style>{STYLE}</style></head>
<body>
<h1>fedtune job report: {_e(status.name)}</h1>
{_summary(status, generated)}
<h2>Plots</h2>
<div class="plots">
{"".join(_figure(p, path, base) for p, path in plots)}
</div>
<h2>Rounds</h2>
<pre>{_e(table)}</pre>
<h2>Clients</h2>
{_clients(status)}
<p><small>The data behind this page: <a href="status.json">status.json</a>.</small></p>
</body></html>
"""


def write_report(status: Any, out: Path) -> Path:
    """Writes the report of ``status`` (a JobStatus) into ``out``; returns the path of its index.html.

    Raises:
        InvalidInput: matplotlib is not installed, or ``out`` is a file or cannot be written.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise InvalidInput(f"`job report` draws its plots with matplotlib: {INSTALL}") from e
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file: give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = render_plots(status, out / "plots")
        (out / "status.json").write_text(json.dumps(status_dict(status), indent=2) + "\n")
        index = out / "index.html"
        index.write_text(page(status, plots, out, datetime.now()))
    except OSError as e:
        raise InvalidInput(f"cannot write the report into {out}: {e.strerror or e}") from e
    return index.resolve()
