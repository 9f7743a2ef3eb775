"""Plot kind: send-queue occupancy (SIOCOUTQ samples) over time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.lines import Line2D

from ..rundir import LoadedRun
from . import kit
from .extract import TraceLoader, moving_mean, placed_traces, send_queue_samples

# Samples averaged into the drawn line: 100 ms at the client's 10 ms sampling,
# which keeps the level and smooths the sawtooth of each burst and its ACKs.
QUEUE_MEAN_SAMPLES = 10
# Request/response workloads hold at most one request in the queue, and a
# 10 ms sample cannot resolve millisecond round trips: their samples would
# draw noise, so only workloads that stream data are plotted.
QUEUE_WORKLOADS = ("bulk", "slow")


@dataclass(frozen=True)
class QueueLine:
    """One client's send-queue samples: ``{conn: (times_s, queued_bytes)}``."""

    label: str
    mode: str
    run: int
    samples: Mapping[int, tuple[Sequence[float], Sequence[int]]]


def queue_panels(runs: Sequence[LoadedRun], load: TraceLoader) -> dict[str, list[QueueLine]]:
    """Send-queue panels from each case's first trace of a streaming workload, where sampled."""
    panels: dict[str, list[QueueLine]] = {}
    for placed in placed_traces(runs, "client", first_only=True, workloads=QUEUE_WORKLOADS):
        samples = send_queue_samples(load(placed.ref.path) or ())
        if samples:
            panels.setdefault(placed.title, []).append(QueueLine(placed.label, placed.mode, placed.run, samples))
    return panels


def draw_send_queue(panels: Mapping[str, Sequence[QueueLine]], runs: Sequence[LoadedRun], path: Path) -> None:
    """Bytes waiting in the kernel's send queue over time, a line per connection."""
    titles = list(panels)[:kit.MAX_PANELS]
    smoothed = False
    with matplotlib.rc_context(kit.STYLE):
        fig, axes = kit.panel_grid(len(titles), 1 if len(titles) == 1 else 2, 3.4)
        for ax, title in zip(axes, titles):
            largest = max(max(q) for line in panels[title] for _, q in line.samples.values())
            divisor, unit = kit.bytes_unit(largest)
            for line in panels[title]:
                conns = len(line.samples)
                colour, ls = kit.mode_colour(line.mode), kit.run_linestyle(line.run)
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
            keys = [Line2D([], [], color=kit.KEY_COLOUR, lw=1.6, label="mean over 100 ms"),
                    Line2D([], [], color=kit.KEY_COLOUR, lw=0.7, alpha=0.4, label="each 10 ms sample")]
        kit.finish(fig, keys + kit.run_legend(runs, with_hatches=False),
                   "Send-queue occupancy (SIOCOUTQ: bytes accepted by send(), not yet acknowledged)", path)


def caption(panels: Mapping[str, Sequence[QueueLine]], runs: Sequence[LoadedRun]) -> str:
    """What to look for in the send queue."""
    return ("Bytes in the client's kernel send queue (accepted by `send()`, not yet acknowledged by the "
            "peer), sampled every 10 ms while a bulk or slow client ran, from each case's first trace: "
            "a blocking `send()` keeps it full and sleeps until the link drains it." + kit.panels_note(len(panels)))
