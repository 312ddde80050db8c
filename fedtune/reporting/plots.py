"""The report's plots, one PNG per series, drawn with matplotlib's object API (no pyplot, no display)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.report import human_bytes
from fedtune.reporting.job_view import (
    base_eval_loss,
    client_train_losses,
    participation,
    round_series,
    traffic,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# 560 x 340 pixels: two side by side fill a 1200-pixel-wide window.
FIGSIZE = (5.6, 3.4)
DPI = 100


@dataclass(frozen=True)
class Plot:
    """One series: its file stem, title, and how to draw it (``draw`` returns False when there is no data)."""

    key: str
    title: str
    draw: Callable[[Axes, Any], bool]
    caption: str  # what the plot shows, under it
    empty: str  # shown instead of the plot when there is nothing to draw


def _rounds_axis(ax: Axes, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _eval_loss(ax: Axes, status: Any) -> bool:
    central = round_series(status, "eval_loss")
    clients = round_series(status, "clients_eval_loss")
    if not central and not clients:
        return False
    if central:
        ax.plot(*zip(*central, strict=True), marker="o", label="coordinator's eval data")
    if clients:
        ax.plot(*zip(*clients, strict=True), marker="s", label="clients' held-out data")
    base = base_eval_loss(status)
    if base is not None:
        # Round 0: the base model alone (what every adapter starts from).
        ax.axhline(base, linestyle="--", color="grey", label="base model")
        ax.plot([0], [base], marker="o", color="grey")
    _rounds_axis(ax, "eval loss")
    ax.legend(fontsize="small")
    return True


def _client_train_loss(ax: Axes, status: Any) -> bool:
    series = client_train_losses(status)
    if not series:
        return False
    for name, points in sorted(series.items()):
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    _rounds_axis(ax, "train loss")
    ax.legend(fontsize="small", ncols=2 if len(series) > 6 else 1)
    return True


def _bytes(ax: Axes, status: Any) -> bool:
    rows = traffic(status)
    if not any(up or down for _, up, down in rows):
        return False
    from matplotlib.ticker import FuncFormatter, NullFormatter

    values = [v for _, up, down in rows for v in (up, down) if v > 0]
    rounds = [r for r, _, _ in rows]
    ax.plot(rounds, [up for _, up, _ in rows], marker="o", label="up (updates)")
    ax.plot(rounds, [down for _, _, down in rows], marker="s", label="down (base, adapters)")
    _rounds_axis(ax, "bytes")
    if max(values) > 50 * min(values):
        # The first round's download (the base) dwarfs the updates: a log scale shows both.
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
    ax.legend(fontsize="small")
    return True


def _participation(ax: Axes, status: Any) -> bool:
    rows = participation(status)
    if not rows:
        return False
    from matplotlib.ticker import MaxNLocator

    rounds = [r for r, _, _ in rows]
    ax.bar(rounds, [cohort for _, cohort, _ in rows], width=0.6, color="#c6dbef", label="cohort (asked)")
    ax.bar(rounds, [done for _, _, done in rows], width=0.35, color="#2171b5", label="contributors")
    _rounds_axis(ax, "clients")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(cohort for _, cohort, _ in rows) * 1.3)  # room for the legend
    ax.legend(fontsize="small")
    return True


def _epsilon(ax: Axes, status: Any) -> bool:
    spent = round_series(status, "epsilon")
    if not spent:
        return False
    ax.plot(*zip(*spent, strict=True), marker="o", color="#d62728")
    delta = round_series(status, "dp_delta")
    _rounds_axis(ax, "epsilon" + (f" (delta {delta[-1][1]:g})" if delta else ""))
    ax.set_ylim(bottom=0)
    return True


PLOTS = (
    Plot("eval_loss", "Eval loss per round", _eval_loss,
         "Loss of each round's aggregated adapter on the job's eval data (and, where clients evaluate, the "
         "example-weighted loss on their held-out data); dashed: the base model alone.",
         "No eval loss: the job has no eval_data and its clients do not evaluate."),
    Plot("client_train_loss", "Each client's train loss", _client_train_loss,
         "The train loss each client reported with its update, per round it contributed to.",
         "No train loss: no client update has been accepted yet."),
    Plot("bytes", "Bytes up and down per round", _bytes,
         "Up: the round's accepted updates. Down: what its cohort fetched (base or emulator files the "
         "first time, then the global adapter).", "No traffic yet."),
    Plot("participation", "Participation per round", _participation,
         "Clients asked to train in each round (the cohort) and those whose update was counted.",
         "No round has opened yet."),
    Plot("dp_epsilon", "DP epsilon spent", _epsilon,
         "Privacy budget spent after each round (RDP accountant, at the job's delta).",
         "No DP epsilon: the job has no privacy section, or no round is aggregated yet."),
)


def render_plots(status: Any, out_dir: Path) -> list[tuple[Plot, Path | None]]:
    """Draws every series of PLOTS into ``out_dir``; None for a series with no data."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[Plot, Path | None]] = []
    for plot in PLOTS:
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        ax.set_title(plot.title)
        path = out_dir / f"{plot.key}.png"
        if plot.draw(ax, status):
            fig.savefig(path)
            drawn.append((plot, path))
        else:
            path.unlink(missing_ok=True)  # a stale plot of an earlier report in the same --out
            drawn.append((plot, None))
    return drawn
