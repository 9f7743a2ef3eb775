"""The registry of plot kinds: what each is called, what data it needs, how it is drawn.

Report and compare draw every kind in :data:`PLOT_KINDS` through
:func:`draw_plots`; a kind whose data the runs do not have (no traces, no echo
workload, no measured value) is left out, and an old file of its name removed.
A new kind is one more entry here, with its extraction and drawing in a module
of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..rundir import LoadedRun
from . import bars, latency, queue, timeline, tseq
from .extract import TraceLoader, trace_loader


@dataclass(frozen=True)
class PlotFile:
    """A plot that was written: file name (under plots/), title, what to look for."""

    name: str
    title: str
    caption: str


@dataclass(frozen=True)
class PlotKind:
    """One kind of plot.

    ``needs`` says what of a run it is drawn from ("traces": the client
    traces; "summary": the summary over repetitions; "captures": the packet
    captures under captures/); ``extract`` returns its
    data, or something empty (None, no panels) when the runs have none;
    ``draw`` writes the PNG; ``caption`` says what to look for.
    """

    name: str
    title: str
    needs: str
    extract: Callable[[Sequence[LoadedRun], TraceLoader], Any]
    draw: Callable[[Any, Sequence[LoadedRun], Path], None]
    caption: Callable[[Any, Sequence[LoadedRun]], str]


def _goodput_caption(data: Any, runs: Sequence[LoadedRun]) -> str:
    return ("Mean over repetitions (bar), each repetition (○) and the 95 % confidence interval of the mean; "
            "colour is the client's mode. Each bar says how many bytes were delivered: a rate over a few "
            "kilobytes is the burst the link's token bucket lets through, not the link's rate.")


def _cpu_caption(data: Any, runs: Sequence[LoadedRun]) -> str:
    return ("Per case: the client's CPU time, its time inside socket calls and waits (where a blocking "
            "program sleeps), and the server's CPU time. Spinning on EAGAIN turns waiting into CPU time.")


PLOT_KINDS: tuple[PlotKind, ...] = (
    PlotKind("send-timeline.png", "Send-call timeline", "traces", timeline.timeline_panels,
             timeline.draw_send_timeline, timeline.caption),
    PlotKind("goodput.png", "Goodput by case", "summary", lambda runs, load: bars.goodput_panels(runs),
             lambda data, runs, path: bars.draw_bars(
                 data, runs, "Goodput by case: bytes delivered × 8 ÷ time from first send() to EOF", path),
             _goodput_caption),
    PlotKind("latency-cdf.png", "Echo latency distribution", "traces", latency.latency_panels,
             latency.draw_latency_cdf, latency.caption),
    PlotKind("cpu-blocked.png", "CPU time and time blocked", "summary", lambda runs, load: bars.cpu_panels(runs),
             lambda data, runs, path: bars.draw_bars(data, runs, "CPU time and time blocked, by case", path),
             _cpu_caption),
    PlotKind("send-queue.png", "Send-queue occupancy", "traces", queue.queue_panels, queue.draw_send_queue,
             queue.caption),
    PlotKind("tcp-sequence.png", "TCP time–sequence graph", "captures", tseq.sequence_panels, tseq.draw_tseq,
             tseq.caption),
)


def draw_plots(runs: Sequence[LoadedRun], out_dir: Path,
               kinds: Sequence[PlotKind] = PLOT_KINDS) -> list[PlotFile]:
    """Draw every kind the runs have data for into ``out_dir``; return what was drawn.

    A plot without data is not drawn, and a file of that name left by an
    earlier drawing is removed, so that the directory matches the report.
    """
    load = trace_loader()
    drawn = []
    for kind in kinds:
        data = kind.extract(runs, load)
        if data:
            kind.draw(data, runs, out_dir / kind.name)
            drawn.append(PlotFile(kind.name, kind.title, kind.caption(data, runs)))
        else:
            (out_dir / kind.name).unlink(missing_ok=True)
    return drawn
