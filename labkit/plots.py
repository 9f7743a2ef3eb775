"""The plots of a run (or of several, side by side), drawn from the run directory alone.

Two layers. Extraction is pure: a trace's records become a send timeline,
request latencies or send-queue samples; records become bars with their
confidence intervals. Drawing takes only that data and writes a PNG with
matplotlib's Agg canvas (no display, no pyplot state).

Encodings are the same in every plot: colour is an I/O mode (one fixed map, so
a mode keeps its colour across plots, runs and comparisons); in a comparison,
line style and bar hatching tell the runs apart; everything else a matrix
sweeps becomes a separate panel.
"""

from __future__ import annotations

import bisect
import gzip
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from socklab.trace import read_trace

from . import stats
from .matrix import Case, format_value
from .rundir import trace_name

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
RUN_LINESTYLES = ("-", "--", ":", "-.")
RUN_HATCHES = ("", "///", "...", "xxx")
RUN_STYLE_NAMES = ("solid lines, plain bars", "dashed lines, bars hatched ///",
                   "dotted lines, dotted bars", "dash-dotted lines, cross-hatched bars")
# Beyond this many panels a figure stops being readable at report width.
MAX_PANELS = 12

PLOT_FILES = ("send-timeline.png", "goodput.png", "latency-cdf.png", "cpu-blocked.png",
              "send-queue.png")

_STYLE = {
    "font.size": 9.5, "axes.titlesize": 10, "axes.labelsize": 9.5, "legend.fontsize": 8.5,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "figure.titlesize": 12,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.color": "#E3E3E3", "grid.linewidth": 0.7, "hatch.linewidth": 0.8,
}
DPI = 110
_WIDTH_IN = 10.0

ACCEPTING_CALLS = ("send", "write")  # asyncio's write() is its send()
_REFUSED = ("EAGAIN", "EWOULDBLOCK")


def mode_colour(mode: str | None) -> str:
    """The colour of an I/O mode in every plot; grey for anything else."""
    return MODE_COLOURS.get(mode or "", _OTHER_COLOUR)


# ------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class PlotRun:
    """What the plots need of one run directory.

    ``label`` tells runs apart in a comparison ("A", "B", ...) and is None for
    a single run's report; ``records`` are its ``cases.jsonl`` records.
    """

    label: str | None
    cases: Sequence[Case]
    records: Sequence[Mapping[str, Any]]
    traces_dir: Path


@dataclass(frozen=True)
class PlotFile:
    """A plot that was written: file name (under plots/), title, what to look for."""

    name: str
    title: str
    caption: str


# -------------------------------------------------------- trace extraction

@dataclass(frozen=True)
class SendTimeline:
    """One client's socket calls as a picture of its sending.

    ``steps_s``/``steps_bytes``: the cumulative bytes send() accepted, as a
    step function of time (seconds since the client started); ``calls``:
    ``(start_s, end_s, level_bytes)`` for every socket call and wait, at the
    level reached when it began; ``refused``: ``(t_s, level_bytes, attempts)``
    of sends that met EAGAIN; ``send_calls`` counts every attempt, merged
    busy-loop retries included.
    """

    steps_s: tuple[float, ...]
    steps_bytes: tuple[int, ...]
    calls: tuple[tuple[float, float, int], ...]
    refused: tuple[tuple[float, int, int], ...]
    send_calls: int
    refused_calls: int
    accepted_bytes: int
    last_accept_s: float | None


def send_timeline(records: Sequence[Mapping[str, Any]]) -> SendTimeline:
    """The send timeline of one trace's records (see :class:`SendTimeline`)."""
    calls = [r for r in records if r["call"] != "outq"]
    # A call's bytes count once it returns; with threads, calls overlap, so
    # the level at any moment is what the calls finished by then accepted.
    accepts = sorted((r["t_s"] + r["dur_s"], r["returned"]) for r in calls
                     if r["call"] in ACCEPTING_CALLS and r["returned"] > 0)
    ends = [end for end, _ in accepts]
    totals = []
    running = 0
    for _, returned in accepts:
        running += returned
        totals.append(running)

    def level_at(t_s: float) -> int:
        i = bisect.bisect_right(ends, t_s)
        return totals[i - 1] if i else 0

    start_s = calls[0]["t_s"] if calls else 0.0
    end_s = max((r["t_s"] + r["dur_s"] for r in calls), default=start_s)
    xs, ys = [start_s], [0]
    for end, total in zip(ends, totals):
        xs += [end, end]
        ys += [ys[-1], total]
    xs.append(end_s)
    ys.append(ys[-1])
    sends = [r for r in calls if r["call"] in ACCEPTING_CALLS]
    refused = tuple((r["t_s"], level_at(r["t_s"]), r["n"]) for r in sends if r["errno"] in _REFUSED)
    return SendTimeline(
        steps_s=tuple(xs), steps_bytes=tuple(ys),
        calls=tuple((r["t_s"], r["t_s"] + r["dur_s"], level_at(r["t_s"])) for r in calls),
        refused=refused, send_calls=sum(r["n"] for r in sends),
        refused_calls=sum(n for _, _, n in refused), accepted_bytes=running,
        last_accept_s=ends[-1] if ends else None)


def request_latencies_s(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each echo request's round trip, rebuilt from its connection's calls.

    A request starts with the first send after the previous reply and ends
    when recv() has returned every byte its sends accepted: the same span the
    client times (from before its send to after the last byte of the echo).
    A shutdown ends the requests, so the server's closing byte count is not
    taken for an echo.
    """
    pending: dict[int, tuple[float, int]] = {}
    latencies = []
    for r in records:
        conn, call = r["conn"], r["call"]
        if call in ACCEPTING_CALLS:
            start_s, awaited = pending.get(conn, (r["t_s"], 0))
            pending[conn] = (start_s, awaited + max(r["returned"], 0))
        elif call == "shutdown":
            pending.pop(conn, None)
        elif call == "recv" and r["returned"] > 0 and conn in pending:
            start_s, awaited = pending[conn]
            awaited -= r["returned"]
            if awaited > 0:
                pending[conn] = (start_s, awaited)
            else:
                latencies.append(r["t_s"] + r["dur_s"] - start_s)
                del pending[conn]
    return latencies


def send_queue_samples(records: Sequence[Mapping[str, Any]]) -> dict[int, tuple[list[float], list[int]]]:
    """SIOCOUTQ samples per connection: ``{conn: (times_s, queued_bytes)}``."""
    samples: dict[int, tuple[list[float], list[int]]] = {}
    for r in records:
        if r["call"] == "outq":
            times, queued = samples.setdefault(r["conn"], ([], []))
            times.append(r["t_s"])
            queued.append(r["returned"])
    return samples


# ------------------------------------------------------- record extraction

@dataclass(frozen=True)
class Bar:
    """One bar: a case's metric for one client group (or the server) in one run."""

    row: str
    run: int
    mode: str
    mean: float | None
    ci95_low: float | None
    ci95_high: float | None
    values: tuple[float, ...]
    note: str = ""


def metric_bars(run: PlotRun, run_index: int, owner: str, metric: str, scale: float = 1.0) -> list[Bar]:
    """A bar per case for ``owner.metric`` (``owner`` a client group or "server").

    Over the repetitions that ran to the end, as summary.csv has them; the
    bar's colour is the owner's mode in that case. Cases without the group
    give no bar.
    """
    bars = []
    for case in run.cases:
        if owner == "server":
            mode = case.experiment.server.mode
        elif any(g.name == owner for g in case.experiment.clients):
            mode = case.experiment.group(owner).mode
        else:
            continue
        values = [stats.case_values(r).get(f"{owner}.{metric}") for r in run.records
                  if r["case"] == case.id and r["status"] == "ok"]
        present = tuple(float(v) * scale for v in values if v is not None)
        summary = stats.summarize(present)
        bars.append(Bar(row=case.id, run=run_index, mode=mode, mean=summary.mean,
                        ci95_low=summary.ci95_low, ci95_high=summary.ci95_high, values=present))
    return bars


@dataclass(frozen=True)
class TraceRef:
    """Where one client container's trace of one repetition is, and what it ran."""

    case: Case
    repetition: int
    group: str
    replica: int
    mode: str
    workload: str
    path: Path


def trace_refs(run: PlotRun) -> list[TraceRef]:
    """Every client trace of the repetitions that ran to the end, in record order."""
    by_id = {case.id: case for case in run.cases}
    refs = []
    for record in run.records:
        case = by_id.get(record["case"])
        if case is None or record["status"] != "ok":
            continue
        for client in record["clients"]:
            key = client["name"] if client["replica"] == 0 else f"{client['name']}#{client['replica']}"
            path = run.traces_dir / trace_name(case.id, record["repetition"], key)
            group = case.experiment.group(client["name"])
            refs.append(TraceRef(case, record["repetition"], client["name"], client["replica"],
                                 client.get("mode") or group.mode, group.workload.kind, path))
    return refs


def first_traces(refs: Iterable[TraceRef]) -> list[TraceRef]:
    """One trace per case and group: the first replica of the first repetition."""
    chosen: dict[tuple[str, str], TraceRef] = {}
    for ref in refs:
        key = (ref.case.id, ref.group)
        best = chosen.get(key)
        if best is None or (ref.repetition, ref.replica) < (best.repetition, best.replica):
            chosen[key] = ref
    return list(chosen.values())


def line_param(cases: Sequence[Case], group: str, prefer: str) -> str | None:
    """The swept mode that the lines of one panel differ by (their colour shows it).

    ``prefer`` is "client" (the group's mode first, then the server's) or
    "server" (the other way round); None when neither is swept, and every
    case then gets a panel of its own.
    """
    swept = {k for case in cases for k in case.params}
    candidates = [f"clients.{group}.mode", "server.mode"]
    if prefer == "server":
        candidates.reverse()
    return next((k for k in candidates if k in swept), None)


def line_identity(ref: TraceRef, key: str | None, prefer: str) -> tuple[str, str]:
    """A line's mode (its colour) and label: the swept mode, or the preferred role's."""
    role = "server" if key == "server.mode" or (key is None and prefer == "server") else "client"
    mode = ref.case.experiment.server.mode if role == "server" else ref.mode
    return mode, f"{mode} {role}"


def panel_title(case: Case, group: str, line_key: str | None, several_groups: bool) -> str:
    """The panel a case's line goes in: every swept value but the line's own."""
    parts = [f"{k.removeprefix('clients.')}={format_value(v)}" for k, v in case.params.items()
             if k != line_key]
    if several_groups:
        parts.insert(0, f"group {group}")
    return ", ".join(parts)


# ------------------------------------------------------------- drawing kit

def _figure(n_panels: int, ncols: int, panel_h_in: float, *, sharey: bool = False,
            sharex: bool = False) -> tuple[Figure, list]:
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(_WIDTH_IN, panel_h_in * nrows + 0.9), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(path)


def _bytes_unit(largest: float) -> tuple[float, str]:
    for divisor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= divisor:
            return divisor, unit
    return 1.0, "B"


def _si(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _run_legend(runs: Sequence[PlotRun], with_hatches: bool) -> list:
    if len(runs) < 2:
        return []
    handles = []
    for i, run in enumerate(runs):
        if with_hatches:
            handles.append(Patch(facecolor="white", edgecolor="#333333", hatch=RUN_HATCHES[i % 4],
                                 label=f"run {run.label}"))
        else:
            handles.append(Line2D([], [], color="#333333", ls=RUN_LINESTYLES[i % 4], label=f"run {run.label}"))
    return handles


def _mode_legend(modes: Iterable[str], suffix: str = "") -> list:
    return [Patch(facecolor=mode_colour(m), label=f"{m}{suffix}") for m in dict.fromkeys(modes)]


def _run_prefix(run: PlotRun) -> str:
    return f"{run.label} · " if run.label is not None else ""


def _panels_note(total: int) -> str:
    return f" The first {MAX_PANELS} of {total} panels are drawn." if total > MAX_PANELS else ""


# ------------------------------------------------------------ send timeline

@dataclass(frozen=True)
class TimelineLine:
    """One client's send timeline in a panel."""

    label: str
    mode: str
    run: int
    timeline: SendTimeline


def zoom_window_s(timelines: Sequence[SendTimeline]) -> float | None:
    """How much of the start to show enlarged, if some client finished too early to see.

    A line that ends within the first 5 % of the panel's time is a sliver at
    its left edge (the tutorial's non-blocking send() returns in a fraction of
    a millisecond beside a blocking one that lasts seconds); the zoom spans
    the early finishers with some room after them. None when all are visible.
    """
    span_s = max((tl.steps_s[-1] for tl in timelines), default=0.0)
    early = [tl.steps_s[-1] for tl in timelines if tl.steps_s[-1] < 0.05 * span_s]
    if not early:
        return None
    wanted_s = max(max(early) * 1.3, 1e-6)
    # A round window (1, 2 or 5 times a power of ten) reads better on the axis.
    power = 10.0 ** math.floor(math.log10(wanted_s))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= wanted_s)


def zoom_top_bytes(timelines: Sequence[SendTimeline], window_s: float) -> int:
    """The zoom's byte range: room for what the early finishers accepted.

    Lines still climbing may leave the zoom at its top; the main axis shows
    them whole, and fitting them would flatten the short lines the zoom is for.
    """
    early = [level_at_s(tl, window_s) for tl in timelines if tl.steps_s[-1] <= window_s]
    top = max(early, default=0) * 2.5
    return int(top) or max((level_at_s(tl, window_s) for tl in timelines), default=0) or 1


def lines_may_overlap(timelines: Sequence[SendTimeline]) -> bool:
    """True when two timelines take nearly the same path (as clients held to one
    link's pace do), so that drawn alike one would hide the other."""
    span_s = max((tl.steps_s[-1] for tl in timelines), default=0.0)
    top = max((tl.accepted_bytes for tl in timelines), default=0) or 1

    def close(a: SendTimeline, b: SendTimeline) -> bool:
        if abs(a.steps_s[-1] - b.steps_s[-1]) > 0.03 * span_s:
            return False
        probes_s = [k / 20 * min(a.steps_s[-1], b.steps_s[-1]) for k in range(1, 21)]
        return all(abs(level_at_s(a, t) - level_at_s(b, t)) <= 0.03 * top for t in probes_s)

    return any(close(a, b) for i, a in enumerate(timelines) for b in timelines[i + 1:])


def level_at_s(timeline: SendTimeline, t_s: float) -> int:
    """Bytes the timeline's sends had accepted by ``t_s``."""
    i = bisect.bisect_right(timeline.steps_s, t_s)
    return timeline.steps_bytes[i - 1] if i else 0


def _draw_timelines(ax, lines: Sequence[TimelineLine], divisor: float, time_scale: float,
                    with_labels: bool) -> bool:
    """Draw the lines on ``ax``; True if any send met EAGAIN."""
    any_refused = False
    overlap = lines_may_overlap([line.timeline for line in lines])
    for k, line in enumerate(lines):
        colour, tl = mode_colour(line.mode), line.timeline
        # Where lines may coincide, earlier ones are drawn wider, so that one
        # hidden under a later line still shows as its outline.
        width = 1.5 + 0.7 * (len(lines) - 1 - k) if overlap else 1.6
        # Thick translucent bars under the line: where the time went.
        ax.add_collection(LineCollection(
            [((s * time_scale, lvl / divisor), (e * time_scale, lvl / divisor)) for s, e, lvl in tl.calls],
            colors=colour, linewidths=7, alpha=0.3, capstyle="butt", zorder=2))
        label = None
        if with_labels:
            calls_text = f"{tl.send_calls:,} send() call{'s' if tl.send_calls != 1 else ''}"
            if tl.refused_calls:
                calls_text += f" ({tl.refused_calls:,} EAGAIN)"
            line_divisor, line_unit = _bytes_unit(tl.accepted_bytes)
            label = (f"{line.label}: {calls_text}, {_si(tl.accepted_bytes / line_divisor)} {line_unit} "
                     f"accepted" + (f" by {_seconds_text(tl.last_accept_s)}" if tl.last_accept_s else ""))
        ax.plot([t * time_scale for t in tl.steps_s], [b / divisor for b in tl.steps_bytes], color=colour,
                lw=width, ls=RUN_LINESTYLES[line.run % 4], label=label, zorder=3)
        if tl.refused:
            any_refused = True
            ax.plot([t * time_scale for t, _, _ in tl.refused], [lvl / divisor for _, lvl, _ in tl.refused],
                    ls="none", marker="|", ms=10, mew=1.0, color=colour, zorder=4)
        if tl.last_accept_s is not None:
            ax.plot([tl.last_accept_s * time_scale], [tl.accepted_bytes / divisor], marker="o", ms=6,
                    color=colour, mec="white", mew=0.8, zorder=5)
    return any_refused


def draw_send_timeline(panels: Mapping[str, Sequence[TimelineLine]], runs: Sequence[PlotRun],
                       path: Path) -> None:
    """Cumulative bytes accepted against time, each call's duration as a thick bar.

    A panel where some client finished very early gets a second axis beside
    it enlarging the start (see :func:`zoom_window_s`); beside, not inset,
    because a line can cross any part of the main axis.
    """
    titles = list(panels)[:MAX_PANELS]
    windows = {t: zoom_window_s([line.timeline for line in panels[t]]) for t in titles}
    with matplotlib.rc_context(_STYLE):
        if any(w is not None for w in windows.values()):
            fig = Figure(figsize=(_WIDTH_IN, 4.0 * len(titles) + 0.9), dpi=DPI, layout="constrained")
            FigureCanvasAgg(fig)
            grid = fig.add_gridspec(len(titles), 2, width_ratios=(2.5, 1))
            axes = [fig.add_subplot(grid[i, 0] if windows[t] is not None else grid[i, :])
                    for i, t in enumerate(titles)]
        else:
            fig, axes = _figure(len(titles), 1 if len(titles) == 1 else 2, 4.2)
            grid = None
        any_refused = False
        for i, (ax, title) in enumerate(zip(axes, titles)):
            lines = panels[title]
            largest = max(max(line.timeline.steps_bytes) for line in lines)
            divisor, unit = _bytes_unit(largest)
            any_refused |= _draw_timelines(ax, lines, divisor, 1.0, with_labels=True)
            # Room above the data for the legend (a row per line), and a little
            # below zero, or the bar of a call that starts at nothing accepted
            # would be cut in half by the axis.
            top = max(largest / divisor, 1e-9) * (1.12 + 0.085 * len(lines))
            ax.set_ylim(-0.03 * top, top)
            ax.set_xlim(left=0)
            ax.set_xlabel("time since the client started (s)")
            ax.set_ylabel(f"bytes send() accepted ({unit})")
            if title:
                ax.set_title(title)
            ax.legend(loc="upper left", frameon=True, framealpha=0.9)
            window_s = windows[title]
            if window_s is None or grid is None:
                continue
            ax.axvspan(0, window_s, color="#BBBBBB", alpha=0.35, lw=0, zorder=1)
            zoom = fig.add_subplot(grid[i, 1])
            zoom_top = zoom_top_bytes([line.timeline for line in lines], window_s)
            zoom_divisor, zoom_unit = _bytes_unit(zoom_top)
            _draw_timelines(zoom, lines, zoom_divisor, 1000.0, with_labels=False)
            zoom_top /= zoom_divisor
            zoom.set_xlim(0, window_s * 1000)
            zoom.set_ylim(-0.04 * zoom_top, zoom_top)
            zoom.set_title(f"the first {_si(window_s * 1000)} ms (shaded at left)")
            zoom.set_xlabel("time since the client started (ms)")
            zoom.set_ylabel(f"bytes send() accepted ({zoom_unit})")
        keys = [Line2D([], [], color="#555555", lw=7, alpha=0.3, label="time inside a socket call or wait"),
                Line2D([], [], ls="none", marker="o", color="#555555", label="last byte accepted")]
        if any_refused:
            keys.append(Line2D([], [], ls="none", marker="|", ms=10, color="#555555",
                               label="send() refused with EAGAIN"))
        keys += _run_legend(runs, with_hatches=False)
        fig.legend(handles=keys, loc="outside lower center", ncols=len(keys), frameon=False)
        fig.suptitle("Send-call timeline: cumulative bytes accepted by send(), one line per mode")
        _save(fig, path)


def timeline_panels(runs: Sequence[PlotRun],
                    load: Callable[[Path], list[dict] | None]) -> dict[str, list[TimelineLine]]:
    """Panels of send timelines: one line per mode (per run), from each case's first trace."""
    panels: dict[str, list[TimelineLine]] = {}
    for index, run in enumerate(runs):
        several_groups = len({g.name for c in run.cases for g in c.experiment.clients}) > 1
        for ref in first_traces(trace_refs(run)):
            if ref.workload == "connect":
                continue  # it never sends: an empty line would only crowd the legend
            records = load(ref.path)
            if not records:
                continue
            timeline = send_timeline(records)
            if timeline.send_calls == 0:
                continue
            key = line_param(run.cases, ref.group, prefer="client")
            mode, label = line_identity(ref, key, prefer="client")
            title = panel_title(ref.case, ref.group, key, several_groups)
            panels.setdefault(title, []).append(TimelineLine(_run_prefix(run) + label, mode, index, timeline))
    return panels


# ---------------------------------------------------------- latency (CDF)

@dataclass(frozen=True)
class LatencyLine:
    """Round-trip latencies of one line of a CDF panel, pooled over repetitions."""

    label: str
    mode: str
    run: int
    latencies_ms: tuple[float, ...]


def latency_panels(runs: Sequence[PlotRun],
                   load: Callable[[Path], list[dict] | None]) -> dict[str, list[LatencyLine]]:
    """CDF panels for echo workloads: one line per server mode, every other sweep a panel."""
    pooled: dict[tuple[str, int, str], tuple[str, str, list[float]]] = {}
    for index, run in enumerate(runs):
        several_groups = len({g.name for c in run.cases for g in c.experiment.clients}) > 1
        for ref in trace_refs(run):
            if ref.workload != "echo":
                continue
            records = load(ref.path)
            if not records:
                continue
            key = line_param(run.cases, ref.group, prefer="server")
            mode, label = line_identity(ref, key, prefer="server")
            title = panel_title(ref.case, ref.group, key, several_groups)
            # Repetitions and replicas of a case pool into its line.
            _, _, values = pooled.setdefault((title, index, ref.case.id), (_run_prefix(run) + label, mode, []))
            values.extend(s * 1000 for s in request_latencies_s(records))
    panels: dict[str, list[LatencyLine]] = {}
    for (title, index, _), (label, mode, values) in pooled.items():
        if values:
            panels.setdefault(title, []).append(LatencyLine(label, mode, index, tuple(sorted(values))))
    return panels


def draw_latency_cdf(panels: Mapping[str, Sequence[LatencyLine]], runs: Sequence[PlotRun],
                     path: Path) -> None:
    """Empirical CDF of round-trip latency per panel, log time axis."""
    titles = list(panels)[:MAX_PANELS]
    low = min(line.latencies_ms[0] for t in titles for line in panels[t])
    high = max(line.latencies_ms[-1] for t in titles for line in panels[t])
    with matplotlib.rc_context(_STYLE):
        ncols = 1 if len(titles) == 1 else 2
        fig, axes = _figure(len(titles), ncols, 3.6, sharex=True, sharey=True)
        for i, (ax, title) in enumerate(zip(axes, titles)):
            for line in panels[title]:
                values = line.latencies_ms
                n = len(values)
                fractions = [(i + 1) / n for i in range(n)]
                p = stats.percentiles(values, (50, 99))
                ax.step(values, fractions, where="post", color=mode_colour(line.mode), lw=1.7,
                        ls=RUN_LINESTYLES[line.run % 4],
                        label=f"{line.label}: p50 {_si(p[50])}, p99 {_si(p[99])}, max {_si(values[-1])} ms")
            for level, name in ((0.5, "p50"), (0.99, "p99")):
                ax.axhline(level, color="#999999", lw=0.8, ls=":", zorder=1)
                ax.annotate(name, (1, level), xycoords=("axes fraction", "data"), xytext=(2, 0),
                            textcoords="offset points", va="center", fontsize=8, color="#777777")
            ax.set_xscale("log")
            ax.set_xlim(low / 1.3, high * 1.3)
            ax.set_ylim(0, 1.02)
            # The axes share both scales: one label per row and per column is enough.
            if i + ncols >= len(titles):
                ax.set_xlabel("round-trip latency (ms, log scale)")
            if i % ncols == 0:
                ax.set_ylabel("fraction of requests (≤ latency)")
            if title:
                ax.set_title(title)
            # Below the axes: the percentiles make the labels too wide to sit
            # anywhere inside without hiding a curve or its tail.
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
        run_keys = _run_legend(runs, with_hatches=False)
        if run_keys:
            fig.legend(handles=run_keys, loc="outside lower center", ncols=len(run_keys), frameon=False)
        fig.suptitle("Echo round-trip latency: cumulative distribution, all repetitions pooled")
        _save(fig, path)


# ------------------------------------------------------------- send queue

@dataclass(frozen=True)
class QueueLine:
    """One client's send-queue samples: ``{conn: (times_s, queued_bytes)}``."""

    label: str
    mode: str
    run: int
    samples: Mapping[int, tuple[Sequence[float], Sequence[int]]]


# Samples averaged into the drawn line: 100 ms at the client's 10 ms sampling,
# which keeps the level and smooths the sawtooth of each burst and its ACKs.
QUEUE_MEAN_SAMPLES = 10
# Request/response workloads hold at most one request in the queue, and a
# 10 ms sample cannot resolve millisecond round trips: their samples would
# draw noise, so only workloads that stream data are plotted.
QUEUE_WORKLOADS = ("bulk", "slow")


def moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred moving mean over ``window`` values (fewer at the ends), so that
    the smoothed line does not lag behind the samples."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    half = window // 2
    means = []
    for i in range(len(values)):
        low, high = max(0, i - half), min(len(values), i - half + window)
        means.append((prefix[high] - prefix[low]) / (high - low))
    return means


def queue_panels(runs: Sequence[PlotRun],
                 load: Callable[[Path], list[dict] | None]) -> dict[str, list[QueueLine]]:
    """Send-queue panels from each case's first trace of a streaming workload, where sampled."""
    panels: dict[str, list[QueueLine]] = {}
    for index, run in enumerate(runs):
        several_groups = len({g.name for c in run.cases for g in c.experiment.clients}) > 1
        for ref in first_traces(trace_refs(run)):
            if ref.workload not in QUEUE_WORKLOADS:
                continue
            samples = send_queue_samples(load(ref.path) or ())
            if not samples:
                continue
            key = line_param(run.cases, ref.group, prefer="client")
            mode, label = line_identity(ref, key, prefer="client")
            title = panel_title(ref.case, ref.group, key, several_groups)
            panels.setdefault(title, []).append(QueueLine(_run_prefix(run) + label, mode, index, samples))
    return panels


def draw_send_queue(panels: Mapping[str, Sequence[QueueLine]], runs: Sequence[PlotRun], path: Path) -> None:
    """Bytes waiting in the kernel's send queue over time, a line per connection."""
    titles = list(panels)[:MAX_PANELS]
    smoothed = False
    with matplotlib.rc_context(_STYLE):
        fig, axes = _figure(len(titles), 1 if len(titles) == 1 else 2, 3.4)
        for ax, title in zip(axes, titles):
            largest = max(max(q) for line in panels[title] for _, q in line.samples.values())
            divisor, unit = _bytes_unit(largest)
            for line in panels[title]:
                conns = len(line.samples)
                colour, ls = mode_colour(line.mode), RUN_LINESTYLES[line.run % 4]
                label = line.label + (f" ({conns} connections)" if conns > 1 else "")
                for conn, (times, queued) in sorted(line.samples.items()):
                    scaled = [q / divisor for q in queued]
                    if len(scaled) > 3 * QUEUE_MEAN_SAMPLES:
                        smoothed = True
                        ax.plot(times, scaled, color=colour, lw=0.7, alpha=0.3, zorder=2)
                        scaled = moving_mean(scaled, QUEUE_MEAN_SAMPLES)
                    # A client that finished within a few samples would draw no visible line.
                    ax.plot(times, scaled, color=colour, ls=ls, lw=1.6, label=label, zorder=3,
                            marker="o" if len(times) < 5 else None, ms=4)
                    label = None
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0, top=max(largest / divisor, 1e-9) * (1.12 + 0.085 * len(panels[title])))
            ax.set_xlabel("time since the client started (s)")
            ax.set_ylabel(f"bytes in the send queue ({unit})")
            if title:
                ax.set_title(title)
            ax.legend(loc="upper right", frameon=True, framealpha=0.9)
        keys = []
        if smoothed:
            keys = [Line2D([], [], color="#555555", lw=1.6, label="mean over 100 ms"),
                    Line2D([], [], color="#555555", lw=0.7, alpha=0.4, label="each 10 ms sample")]
        keys += _run_legend(runs, with_hatches=False)
        if keys:
            fig.legend(handles=keys, loc="outside lower center", ncols=len(keys), frameon=False)
        fig.suptitle("Send-queue occupancy (SIOCOUTQ: bytes accepted by send(), not yet acknowledged)")
        _save(fig, path)


# ------------------------------------------------------------------ bars

@dataclass(frozen=True)
class BarPanel:
    """One panel of horizontal bars: a metric over the cases; ``value_text``
    writes a bar's mean beside it."""

    title: str
    xlabel: str
    value_text: Callable[[float], str]
    bars: Sequence[Bar]


def draw_bars(panels: Sequence[BarPanel], rows: Sequence[str], runs: Sequence[PlotRun], title: str,
              path: Path, *, mode_suffix: str = "") -> None:
    """Panels three to a row, a row per case, a bar per run: mean, 95 % CI, each repetition."""
    n_runs = max(len(runs), 1)
    height = 0.8 / n_runs
    index = {row: i for i, row in enumerate(rows)}
    row_h_in = 0.42 + 0.22 * (n_runs - 1)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(_WIDTH_IN, nrows * max(2.0, row_h_in * len(rows) + 1.1) + 0.5), dpi=DPI,
                     layout="constrained")
        FigureCanvasAgg(fig)
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
                ax.barh(y, bar.mean, height=height * 0.85, color=mode_colour(bar.mode),
                        hatch=RUN_HATCHES[bar.run % 4] if n_runs > 1 else "", edgecolor="white", zorder=2)
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
        keys = _mode_legend(modes, mode_suffix)
        keys.append(Line2D([], [], ls="none", marker="o", ms=4, mfc="white", mec="#222222",
                           label="one repetition"))
        keys.append(Line2D([], [], color="#222222", marker="|", ms=8, lw=1, label="95 % confidence interval"))
        keys += _run_legend(runs, with_hatches=True)
        fig.legend(handles=keys, loc="outside lower center", ncols=min(len(keys), 6), frameon=False)
        fig.suptitle(title)
        _save(fig, path)


def _rows(runs: Sequence[PlotRun]) -> list[str]:
    return list(dict.fromkeys(case.id for run in runs for case in run.cases))


def _groups(runs: Sequence[PlotRun]) -> list[str]:
    return list(dict.fromkeys(g.name for run in runs for case in run.cases for g in case.experiment.clients))


def _mbit_text(value: float) -> str:
    return f"{_si(value)} Mbit/s"


def _bytes_text(value: float) -> str:
    divisor, unit = _bytes_unit(value)
    return f"{_si(value / divisor)} {unit}"


def goodput_panels(runs: Sequence[PlotRun]) -> list[BarPanel]:
    """Goodput (Mbit/s) per client group, over the cases; groups without any value left out.

    Each bar says how many bytes its rate was measured over: a rate over a
    few kilobytes is the burst a token bucket lets through, not the link's.
    """
    panels = []
    groups = _groups(runs)
    for group in groups:
        bars = []
        for i, run in enumerate(runs):
            delivered = {b.row: b.mean for b in metric_bars(run, i, group, "bytes_delivered")}
            bars += [replace(b, note=f" over {_bytes_text(delivered[b.row])}" if delivered.get(b.row) else "")
                     for b in metric_bars(run, i, group, "goodput_bps", 1e-6)]
        if any(b.mean is not None for b in bars):
            title = f"group {group}" if len(groups) > 1 else ""
            panels.append(BarPanel(title, "goodput (Mbit/s, delivered to the server's EOF)", _mbit_text, bars))
    return panels


def cpu_panels(runs: Sequence[PlotRun]) -> list[BarPanel]:
    """CPU seconds and blocked seconds of each client group, and the server's CPU seconds."""
    panels = []
    groups = _groups(runs)
    for group in groups:
        suffix = f", group {group}" if len(groups) > 1 else ""
        for metric, title, xlabel in (
                ("cpu_s", f"client CPU time{suffix}", "CPU time (s, user + system)"),
                ("blocked_s", f"client time blocked{suffix}", "time inside socket calls and waits (s)")):
            bars = [b for i, run in enumerate(runs) for b in metric_bars(run, i, group, metric)]
            if any(b.mean is not None for b in bars):
                panels.append(BarPanel(title, xlabel, _seconds_text, bars))
    if not panels:
        return []
    bars = [b for i, run in enumerate(runs) for b in metric_bars(run, i, "server", "cpu_s")]
    if any(b.mean is not None for b in bars):
        panels.append(BarPanel("server CPU time (colour: server mode)", "CPU time (s, user + system)",
                               _seconds_text, bars))
    return panels


# ------------------------------------------------------------------ all

def trace_loader() -> Callable[[Path], list[dict] | None]:
    """Reads each trace once; a missing or damaged trace reads as None."""
    cache: dict[Path, list[dict] | None] = {}

    def load(path: Path) -> list[dict] | None:
        if path not in cache:
            try:
                cache[path] = read_trace(str(path))[1]
            except (OSError, EOFError, ValueError, KeyError, zlib.error, gzip.BadGzipFile):
                cache[path] = None
        return cache[path]

    return load


def draw_plots(runs: Sequence[PlotRun], out_dir: Path) -> list[PlotFile]:
    """Draw every plot the runs have data for into ``out_dir``; return what was drawn.

    A plot without data is not drawn, and a file of that name left by an
    earlier drawing is removed, so that the directory matches the report.
    """
    load = trace_loader()
    drawn: list[PlotFile] = []
    rows = _rows(runs)
    compare = len(runs) > 1
    several = "the runs'" if compare else "each"

    panels = timeline_panels(runs, load)
    if panels:
        draw_send_timeline(panels, runs, out_dir / "send-timeline.png")
        drawn.append(PlotFile(
            "send-timeline.png", "Send-call timeline",
            f"Cumulative bytes `send()` accepted against time, from {several} case's first trace. The thick "
            "translucent bars are the time spent inside each socket call or wait: a blocking `send()` is one "
            "long bar (it sleeps until the link has carried the data), the tutorial's non-blocking `send()` "
            "ends after one short call, and a spinning sender's refused attempts (EAGAIN, │) form a dense "
            "band." + _panels_note(len(panels))))

    panel_list = goodput_panels(runs)
    if panel_list:
        draw_bars(panel_list, rows, runs, "Goodput by case: bytes delivered × 8 ÷ time from first send() to EOF",
                  out_dir / "goodput.png", mode_suffix=" client")
        drawn.append(PlotFile(
            "goodput.png", "Goodput by case",
            "Mean over repetitions (bar), each repetition (○) and the 95 % confidence interval of the mean; "
            "colour is the client's mode. Each bar says how many bytes were delivered: a rate over a few "
            "kilobytes is the burst the link's token bucket lets through, not the link's rate."))

    latency = latency_panels(runs, load)
    if latency:
        draw_latency_cdf(latency, runs, out_dir / "latency-cdf.png")
        drawn.append(PlotFile(
            "latency-cdf.png", "Echo latency distribution",
            "Share of echo requests answered within a given round-trip time (log scale), every request of "
            "every repetition, rebuilt from the traces. A curve further left is faster; a long flat tail "
            "is requests that waited, e.g. for an iterative server to finish with another connection."
            + _panels_note(len(latency))))

    panel_list = cpu_panels(runs)
    if panel_list:
        draw_bars(panel_list, rows, runs, "CPU time and time blocked, by case", out_dir / "cpu-blocked.png")
        drawn.append(PlotFile(
            "cpu-blocked.png", "CPU time and time blocked",
            "Per case: the client's CPU time, its time inside socket calls and waits (where a blocking "
            "program sleeps), and the server's CPU time. Spinning on EAGAIN turns waiting into CPU time."))

    queue = queue_panels(runs, load)
    if queue:
        draw_send_queue(queue, runs, out_dir / "send-queue.png")
        drawn.append(PlotFile(
            "send-queue.png", "Send-queue occupancy",
            "Bytes in the client's kernel send queue (accepted by `send()`, not yet acknowledged by the "
            "peer), sampled every 10 ms while a bulk or slow client ran, from each case's first trace: "
            "a blocking `send()` keeps it full and sleeps until the link drains it." + _panels_note(len(queue))))

    names = {p.name for p in drawn}
    for name in PLOT_FILES:
        if name not in names:
            (out_dir / name).unlink(missing_ok=True)
    return drawn
