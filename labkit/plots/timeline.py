"""Plot kind: the send-call timeline (cumulative bytes send() accepted against time)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D

from ..rundir import LoadedRun
from . import kit
from .extract import SendTimeline, TraceLoader, level_at_s, placed_traces, send_timeline


@dataclass(frozen=True)
class TimelineLine:
    """One client's send timeline in a panel."""

    label: str
    mode: str
    run: int
    timeline: SendTimeline


def timeline_panels(runs: Sequence[LoadedRun], load: TraceLoader) -> dict[str, list[TimelineLine]]:
    """Panels of send timelines: one line per mode (per run), from each case's first trace."""
    panels: dict[str, list[TimelineLine]] = {}
    # A connect workload never sends: an empty line would only crowd the legend.
    for placed in placed_traces(runs, "client", first_only=True, skip=("connect",)):
        records = load(placed.ref.path)
        if not records:
            continue
        timeline = send_timeline(records)
        if timeline.send_calls == 0:
            continue
        panels.setdefault(placed.title, []).append(TimelineLine(placed.label, placed.mode, placed.run, timeline))
    return panels


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


def _draw_timelines(ax, lines: Sequence[TimelineLine], divisor: float, time_scale: float,
                    with_labels: bool) -> bool:
    """Draw the lines on ``ax``; True if any send met EAGAIN."""
    any_refused = False
    overlap = lines_may_overlap([line.timeline for line in lines])
    for k, line in enumerate(lines):
        colour, tl = kit.mode_colour(line.mode), line.timeline
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
            label = (f"{line.label}: {calls_text}, {kit.bytes_text(tl.accepted_bytes)} accepted"
                     + (f" by {kit.seconds_text(tl.last_accept_s)}" if tl.last_accept_s else ""))
        ax.plot([t * time_scale for t in tl.steps_s], [b / divisor for b in tl.steps_bytes], color=colour,
                lw=width, ls=kit.run_linestyle(line.run), label=label, zorder=3)
        if tl.refused:
            any_refused = True
            ax.plot([t * time_scale for t, _, _ in tl.refused], [lvl / divisor for _, lvl, _ in tl.refused],
                    ls="none", marker="|", ms=10, mew=1.0, color=colour, zorder=4)
        if tl.last_accept_s is not None:
            ax.plot([tl.last_accept_s * time_scale], [tl.accepted_bytes / divisor], marker="o", ms=6,
                    color=colour, mec="white", mew=0.8, zorder=5)
    return any_refused


def draw_send_timeline(panels: Mapping[str, Sequence[TimelineLine]], runs: Sequence[LoadedRun],
                       path: Path) -> None:
    """Cumulative bytes accepted against time, each call's duration as a thick bar.

    A panel where some client finished very early gets a second axis beside
    it enlarging the start (see :func:`zoom_window_s`); beside, not inset,
    because a line can cross any part of the main axis.
    """
    titles = list(panels)[:kit.MAX_PANELS]
    windows = {t: zoom_window_s([line.timeline for line in panels[t]]) for t in titles}
    with matplotlib.rc_context(kit.STYLE):
        if any(w is not None for w in windows.values()):
            fig = kit.new_figure(4.0 * len(titles) + 0.9)
            grid = fig.add_gridspec(len(titles), 2, width_ratios=(2.5, 1))
            axes = [fig.add_subplot(grid[i, 0] if windows[t] is not None else grid[i, :])
                    for i, t in enumerate(titles)]
        else:
            fig, axes = kit.panel_grid(len(titles), 1 if len(titles) == 1 else 2, 4.2)
            grid = None
        any_refused = False
        for i, (ax, title) in enumerate(zip(axes, titles)):
            lines = panels[title]
            largest = max(max(line.timeline.steps_bytes) for line in lines)
            divisor, unit = kit.bytes_unit(largest)
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
            zoom_divisor, zoom_unit = kit.bytes_unit(zoom_top)
            _draw_timelines(zoom, lines, zoom_divisor, 1000.0, with_labels=False)
            zoom_top /= zoom_divisor
            zoom.set_xlim(0, window_s * 1000)
            zoom.set_ylim(-0.04 * zoom_top, zoom_top)
            zoom.set_title(f"the first {kit.si(window_s * 1000)} ms (shaded at left)")
            zoom.set_xlabel("time since the client started (ms)")
            zoom.set_ylabel(f"bytes send() accepted ({zoom_unit})")
        keys = [Line2D([], [], color=kit.KEY_COLOUR, lw=7, alpha=0.3, label="time inside a socket call or wait"),
                Line2D([], [], ls="none", marker="o", color=kit.KEY_COLOUR, label="last byte accepted")]
        if any_refused:
            keys.append(Line2D([], [], ls="none", marker="|", ms=10, color=kit.KEY_COLOUR,
                               label="send() refused with EAGAIN"))
        kit.finish(fig, keys + kit.run_legend(runs, with_hatches=False),
                   "Send-call timeline: cumulative bytes accepted by send(), one line per mode", path)


def caption(panels: Mapping[str, Sequence[TimelineLine]], runs: Sequence[LoadedRun]) -> str:
    """What to look for in the timeline."""
    several = "the runs'" if len(runs) > 1 else "each"
    return (f"Cumulative bytes `send()` accepted against time, from {several} case's first trace. The thick "
            "translucent bars are the time spent inside each socket call or wait: a blocking `send()` is one "
            "long bar (it sleeps until the link has carried the data), the tutorial's non-blocking `send()` "
            "ends after one short call, and a spinning sender's refused attempts (EAGAIN, │) form a dense "
            "band." + kit.panels_note(len(panels)))
