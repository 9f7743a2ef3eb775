"""The drawing kit every plot kind shares: colours per mode, styles per run, the
figure, its footer legend and the atomic save, and how numbers are written.

Encodings are the same in every plot: colour is an I/O mode (one fixed map, so
a mode keeps its colour across plots, runs and comparisons); in a comparison,
line style and bar hatching tell the runs apart; everything else a matrix
sweeps becomes a separate panel.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from socklab.atomic import replacing

from ..rundir import LoadedRun

# Okabe-Ito's colour-blind-safe colours first, for the modes the tutorial is
# about; the rest stay distinct from them and from each other.
MODE_COLOURS: Mapping[str, str] = {
    "blocking": "#0072B2",
    "nonblocking": "#D55E00",
    "nonblocking-spin": "#E69F00",
    "select": "#009E73",
    "poll": "#999933",
    "epoll": "#6A3D9A",
    "threaded": "#CC79A7",
    "asyncio": "#8C564B",
    "timeout": "#56B4E9",
}
_OTHER_COLOUR = "#7F7F7F"
KEY_COLOUR = "#555555"  # legend keys that stand for every mode
RUN_LINESTYLES = ("-", "--", ":", "-.")
RUN_HATCHES = ("", "///", "...", "xxx")
RUN_STYLE_NAMES = ("solid lines, plain bars", "dashed lines, bars hatched ///",
                   "dotted lines, dotted bars", "dash-dotted lines, cross-hatched bars")
# One line style and hatch per run; more runs than that would not stay readable.
MAX_RUNS = len(RUN_LINESTYLES)
# Beyond this many panels a figure stops being readable at report width.
MAX_PANELS = 12

STYLE = {
    "font.size": 9.5, "axes.titlesize": 10, "axes.labelsize": 9.5, "legend.fontsize": 8.5,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "figure.titlesize": 12,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.color": "#E3E3E3", "grid.linewidth": 0.7, "hatch.linewidth": 0.8,
}
DPI = 110
WIDTH_IN = 10.0


# A program of the user's is its role's mode (its file's name): programs take these
# in the order they are first drawn, so that two programs never share a colour
# and each keeps its colour in every plot of a report or comparison.
_PROGRAM_COLOURS = ("#1B9E77", "#D95F02", "#7570B3", "#E7298A", "#66A61E", "#A6761D")
_program_colours: dict[str, str] = {}


def mode_colour(mode: str | None) -> str:
    """The colour of an I/O mode in every plot: a built-in mode's own; a program's (a name
    with a dot: ``block_client.py``) one of a second palette; grey otherwise."""
    if mode in MODE_COLOURS:
        return MODE_COLOURS[mode]
    if mode and "." in mode:
        if mode not in _program_colours:
            _program_colours[mode] = _PROGRAM_COLOURS[len(_program_colours) % len(_PROGRAM_COLOURS)]
        return _program_colours[mode]
    return _OTHER_COLOUR


def run_linestyle(run: int) -> str:
    """The line style of the ``run``-th run of a comparison."""
    return RUN_LINESTYLES[run % MAX_RUNS]


def run_hatch(run: int) -> str:
    """The bar hatching of the ``run``-th run of a comparison."""
    return RUN_HATCHES[run % MAX_RUNS]


def new_figure(height_in: float) -> Figure:
    """An empty figure at report width on matplotlib's Agg canvas (no display, no pyplot state)."""
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_grid(n_panels: int, ncols: int, panel_h_in: float, *, sharey: bool = False,
               sharex: bool = False) -> tuple[Figure, list]:
    """A figure of ``n_panels`` axes, ``ncols`` to a row (the unused ones hidden)."""
    nrows = math.ceil(n_panels / ncols)
    fig = new_figure(panel_h_in * nrows + 0.9)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def finish(fig: Figure, keys: Sequence, title: str, path: Path, max_cols: int | None = None) -> None:
    """The figure's footer legend (if any keys) and title, then save it as PNG."""
    if keys:
        fig.legend(handles=list(keys), loc="outside lower center", ncols=min(len(keys), max_cols or len(keys)),
                   frameon=False)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, "wb") as fh:
        fig.savefig(fh, dpi=DPI, format="png")


def run_legend(runs: Sequence[LoadedRun], with_hatches: bool) -> list:
    """Keys telling the runs of a comparison apart (none for a single run)."""
    if len(runs) < 2:
        return []
    if with_hatches:
        return [Patch(facecolor="white", edgecolor="#333333", hatch=run_hatch(i), label=f"run {run.label}")
                for i, run in enumerate(runs)]
    return [Line2D([], [], color="#333333", ls=run_linestyle(i), label=f"run {run.label}")
            for i, run in enumerate(runs)]


def mode_legend(modes: Iterable[str], suffix: str = "") -> list:
    """A colour key per mode, in first-seen order."""
    return [Patch(facecolor=mode_colour(m), label=f"{m}{suffix}") for m in dict.fromkeys(modes)]


def panels_note(total: int) -> str:
    """The caption's note when there were more panels than a figure draws."""
    return f" The first {MAX_PANELS} of {total} panels are drawn." if total > MAX_PANELS else ""


def bytes_unit(largest: float) -> tuple[float, str]:
    """The divisor and unit (B, kB, MB, GB) to show bytes up to ``largest`` in."""
    for divisor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= divisor:
            return divisor, unit
    return 1.0, "B"


def si(value: float) -> str:
    """A number for a label: thousands grouped, else three significant digits."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def seconds_text(seconds: float) -> str:
    """A duration in ms below a second, else in s."""
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def mbit_text(value: float) -> str:
    """A rate already in Mbit/s."""
    return f"{si(value)} Mbit/s"


def bytes_text(value: float) -> str:
    """A byte count in its unit."""
    divisor, unit = bytes_unit(value)
    return f"{si(value / divisor)} {unit}"
