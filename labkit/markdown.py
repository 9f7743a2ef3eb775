"""The Markdown that report.md and compare.md share: table rows, a mean with its
confidence interval, the plots section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from . import stats

MISSING = "–"


@dataclass(frozen=True)
class Shown:
    """How a metric of the summary is shown: the report's short column heading, the
    comparison's longer one, and the unit a scale turns its value into."""

    metric: str
    column: str
    heading: str
    scale: float = 1.0
    unit: str = ""

    def title(self, text: str) -> str:
        """``text`` with the unit in brackets, if it has one."""
        return text + (f" ({self.unit})" if self.unit else "")


# Every metric a table shows; ``metric`` as the summary names it, under GROUP. for a client group's.
SHOWN = {s.metric: s for s in (
    Shown("bytes_accepted", "accepted", "bytes accepted", unit="B"),
    Shown("bytes_delivered", "delivered", "bytes delivered", unit="B"),
    Shown("send_calls", "send calls", "send() calls"),
    Shown("eagain", "EAGAIN", "EAGAIN"),
    Shown("send_s", "in send()", "time in send()", unit="s"),
    Shown("blocked_s", "blocked", "time blocked", unit="s"),
    Shown("cpu_s", "CPU", "client CPU time", unit="s"),
    Shown("goodput_bps", "goodput", "goodput", 1e-6, "Mbit/s"),
    Shown("latency_ms.p50", "p50 latency", "p50 latency", unit="ms"),
    Shown("latency_ms.p99", "p99 latency", "p99 latency", unit="ms"),
    Shown("server.bytes_received", "received", "bytes the server received", unit="B"),
    Shown("server.cpu_s", "CPU", "server CPU time", unit="s"),
    Shown("server.max_concurrent", "max concurrent", "connections served at once"),
    Shown("case.wall_s", "case wall time", "case wall time", unit="s"),
)}


def cell(text: str) -> str:
    """Text made safe for one table cell (no column breaks, no line breaks)."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines; cells are made safe with :func:`cell`."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def number(value: float) -> str:
    """A measured value as tables show it: thousands grouped, else four significant digits."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def mean_ci(summary: stats.Summary | None, scale: float = 1.0) -> str:
    """A mean ± half its 95 % confidence interval, in the unit ``scale`` converts to;
    "–" where there is no value."""
    if summary is None or summary.mean is None:
        return MISSING
    text = number(summary.mean * scale)
    if summary.ci95_low is not None and summary.ci95_high is not None:
        half = (summary.ci95_high - summary.ci95_low) / 2 * scale
        text += f" ± {half:,.0f}" if half >= 1000 else f" ± {half:.2g}"
    return text


def plots_section(plot_files: Sequence, intro: str = "") -> list[str]:
    """The "## Plots" section embedding each drawn plot (from plots/) with its caption;
    nothing when none was drawn."""
    if not plot_files:
        return []
    lines = ["## Plots", ""] + ([intro, ""] if intro else [])
    for plot in plot_files:
        lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.name})", "", plot.caption, ""]
    return lines


def shaping_text(backend: object) -> str:
    """meta.json's shaping backend: one name, or the names joined where cases differed."""
    if isinstance(backend, list):
        return ", ".join(map(str, backend)) + " (cases differ)"
    return "?" if backend is None else str(backend)
