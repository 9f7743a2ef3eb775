"""Plot kinds drawn as bars over the cases, from the run's summary: goodput, and
CPU time with time blocked."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
from matplotlib.lines import Line2D

from ..rundir import LoadedRun
from . import kit
from .extract import Bar, bar_rows, client_groups, metric_bars


@dataclass(frozen=True)
class BarPanel:
    """One panel of horizontal bars: a metric over the cases; ``value_text``
    writes a bar's mean beside it."""

    title: str
    xlabel: str
    value_text: Callable[[float], str]
    bars: Sequence[Bar]


@dataclass(frozen=True)
class BarFigure:
    """The panels of one bar plot, and the suffix of its mode keys (" client")."""

    panels: Sequence[BarPanel]
    mode_suffix: str = ""


def draw_bars(figure: BarFigure, runs: Sequence[LoadedRun], title: str, path: Path) -> None:
    """Panels three to a row, a row per case, a bar per run: mean, 95 % CI, each repetition."""
    panels, rows = figure.panels, bar_rows(runs)
    n_runs = max(len(runs), 1)
    height = 0.8 / n_runs
    index = {row: i for i, row in enumerate(rows)}
    row_h_in = 0.42 + 0.22 * (n_runs - 1)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context(kit.STYLE):
        fig = kit.new_figure(nrows * max(2.0, row_h_in * len(rows) + 1.1) + 0.5)
        axes = [ax for line in fig.subplots(nrows, ncols, squeeze=False, sharey=True) for ax in line]
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        modes: list[str] = []
        for ax, panel in zip(axes, panels):
            tops = [max([b.mean or 0, b.ci95_high or 0, *b.values]) for b in panel.bars]
            right = max(tops, default=0) or 1.0
            for bar in panel.bars:
                y = index[bar.row] + (bar.run - (n_runs - 1) / 2) * height
                if bar.mean is None:
                    ax.annotate("not measured", (0, y), xytext=(4, 0), textcoords="offset points",
                                va="center", fontsize=8, color="#888888", style="italic")
                    continue
                modes.append(bar.mode)
                ax.barh(y, bar.mean, height=height * 0.85, color=kit.mode_colour(bar.mode),
                        hatch=kit.run_hatch(bar.run) if n_runs > 1 else "", edgecolor="white", zorder=2)
                if bar.ci95_low is not None and bar.ci95_high is not None:
                    ax.errorbar(bar.mean, y, xerr=[[bar.mean - bar.ci95_low], [bar.ci95_high - bar.mean]],
                                fmt="none", ecolor="#222222", elinewidth=1, capsize=3, zorder=3)
                ax.plot(bar.values, [y] * len(bar.values), ls="none", marker="o", ms=3.2, mfc="white",
                        mec="#222222", mew=0.8, zorder=4)
                # Beside the furthest mark, in points so that it never touches it.
                end = max([bar.mean, bar.ci95_high or 0, *bar.values])
                ax.annotate(panel.value_text(bar.mean) + bar.note, (end, y), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=8, zorder=5)
            ax.set_xlim(0, right * 1.45)
            ax.set_title(panel.title)
            ax.set_xlabel(panel.xlabel)
            ax.grid(axis="y", visible=False)
        axes[0].set_yticks(range(len(rows)), [row.replace(",", "\n") for row in rows])
        axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first case on top, as in the tables
        keys = kit.mode_legend(modes, figure.mode_suffix)
        keys.append(Line2D([], [], ls="none", marker="o", ms=4, mfc="white", mec="#222222",
                           label="one repetition"))
        keys.append(Line2D([], [], color="#222222", marker="|", ms=8, lw=1, label="95 % confidence interval"))
        kit.finish(fig, keys + kit.run_legend(runs, with_hatches=True), title, path, max_cols=6)


def goodput_panels(runs: Sequence[LoadedRun]) -> BarFigure | None:
    """Goodput (Mbit/s) per client group, over the cases; groups without any value left out.

    Each bar says how many bytes its rate was measured over: a rate over a
    few kilobytes is the burst a token bucket lets through, not the link's.
    """
    panels = []
    groups = client_groups(runs)
    for group in groups:
        bars = []
        for i, run in enumerate(runs):
            delivered = {b.row: b.mean for b in metric_bars(run, i, group, "bytes_delivered")}
            bars += [replace(b, note=f" over {kit.bytes_text(delivered[b.row])}" if delivered.get(b.row) else "")
                     for b in metric_bars(run, i, group, "goodput_bps", 1e-6)]
        if any(b.mean is not None for b in bars):
            title = f"group {group}" if len(groups) > 1 else ""
            panels.append(BarPanel(title, "goodput (Mbit/s, delivered to the server's EOF)", kit.mbit_text, bars))
    return BarFigure(panels, mode_suffix=" client") if panels else None


def cpu_panels(runs: Sequence[LoadedRun]) -> BarFigure | None:
    """CPU seconds and blocked seconds of each client group, and the server's CPU seconds."""
    panels = []
    groups = client_groups(runs)
    for group in groups:
        suffix = f", group {group}" if len(groups) > 1 else ""
        for metric, title, xlabel in (
                ("cpu_s", f"client CPU time{suffix}", "CPU time (s, user + system)"),
                ("blocked_s", f"client time blocked{suffix}", "time inside socket calls and waits (s)")):
            bars = [b for i, run in enumerate(runs) for b in metric_bars(run, i, group, metric)]
            if any(b.mean is not None for b in bars):
                panels.append(BarPanel(title, xlabel, kit.seconds_text, bars))
    if not panels:
        return None
    bars = [b for i, run in enumerate(runs) for b in metric_bars(run, i, "server", "cpu_s")]
    if any(b.mean is not None for b in bars):
        panels.append(BarPanel("server CPU time (colour: server mode)", "CPU time (s, user + system)",
                               kit.seconds_text, bars))
    return BarFigure(panels)
