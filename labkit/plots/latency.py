"""Plot kind: the echo latency CDF, a line per case, all repetitions pooled.

The curve is every request rebuilt from the traces. Its legend gives the p50
and p99 that the report's table gives, from the run's one summary: each
repetition's percentile as its client measured it (by the lab's one
definition, :mod:`socklab.percentile`), averaged over the repetitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

from ..rundir import LoadedRun
from . import kit
from .extract import TraceLoader, placed_traces, request_latencies_s


@dataclass(frozen=True)
class LatencyLine:
    """Round-trip latencies of one line of a CDF panel, pooled over repetitions, and
    the case's p50/p99 from the run's summary (None where the records have none)."""

    label: str
    mode: str
    run: int
    latencies_ms: tuple[float, ...]
    p50_ms: float | None = None
    p99_ms: float | None = None

    def legend(self) -> str:
        """The line's legend entry: the table's percentiles and the slowest request."""
        shown = [f"{name} {kit.si(value)}" for name, value in (("p50", self.p50_ms), ("p99", self.p99_ms))
                 if value is not None]
        return f"{self.label}: {', '.join([*shown, f'max {kit.si(self.latencies_ms[-1])}'])} ms"


def latency_panels(runs: Sequence[LoadedRun], load: TraceLoader) -> dict[str, list[LatencyLine]]:
    """CDF panels for echo workloads: one line per server mode, every other sweep a panel."""
    pooled: dict[tuple[str, int, str], tuple[str, str, str, list[float]]] = {}
    for placed in placed_traces(runs, "server", first_only=False, workloads=("echo",)):
        records = load(placed.ref.path)
        if not records:
            continue
        # Repetitions and replicas of a case pool into its line.
        _, _, _, values = pooled.setdefault((placed.title, placed.run, placed.ref.case.id),
                                            (placed.label, placed.mode, placed.ref.group, []))
        values.extend(s * 1000 for s in request_latencies_s(records))
    panels: dict[str, list[LatencyLine]] = {}
    for (title, index, case_id), (label, mode, group, values) in pooled.items():
        if values:
            p50, p99 = (_summary_mean(runs[index], case_id, f"{group}.latency_ms.{p}") for p in ("p50", "p99"))
            panels.setdefault(title, []).append(LatencyLine(label, mode, index, tuple(sorted(values)), p50, p99))
    return panels


def _summary_mean(run: LoadedRun, case_id: str, name: str) -> float | None:
    case = run.summary.get(case_id)
    found = case.metric(name) if case is not None else None
    return found.summary.mean if found is not None else None


def draw_latency_cdf(panels: Mapping[str, Sequence[LatencyLine]], runs: Sequence[LoadedRun],
                     path: Path) -> None:
    """Empirical CDF of round-trip latency per panel, log time axis."""
    titles = list(panels)[:kit.MAX_PANELS]
    low = min(line.latencies_ms[0] for t in titles for line in panels[t])
    high = max(line.latencies_ms[-1] for t in titles for line in panels[t])
    with matplotlib.rc_context(kit.STYLE):
        ncols = 1 if len(titles) == 1 else 2
        fig, axes = kit.panel_grid(len(titles), ncols, 3.6, sharex=True, sharey=True)
        for i, (ax, title) in enumerate(zip(axes, titles)):
            for line in panels[title]:
                n = len(line.latencies_ms)
                ax.step(line.latencies_ms, [(k + 1) / n for k in range(n)], where="post",
                        color=kit.mode_colour(line.mode), lw=1.7, ls=kit.run_linestyle(line.run),
                        label=line.legend())
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
        kit.finish(fig, kit.run_legend(runs, with_hatches=False),
                   "Echo round-trip latency: cumulative distribution, all repetitions pooled", path)


def caption(panels: Mapping[str, Sequence[LatencyLine]], runs: Sequence[LoadedRun]) -> str:
    """What to look for in the CDF, and where the legend's numbers come from."""
    return ("Share of echo requests answered within a given round-trip time (log scale), every request of "
            "every repetition, rebuilt from the traces. A curve further left is faster; a long flat tail "
            "is requests that waited, e.g. for an iterative server to finish with another connection. "
            "The legend's p50 and p99 are the tables': each repetition's percentile (nearest rank), "
            "averaged over the repetitions." + kit.panels_note(len(panels)))
