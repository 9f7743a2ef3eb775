"""The summary over repetitions, computed once per loaded run: summary.csv,
the report's and the comparison's tables and the plots' bars all read it.

Only repetitions that ran to the end (status ok) are summarised; ``runs`` and
``failed`` count all of them. Summaries are kept at summary.csv's precision (10
significant digits), so a table never shows a number the file does not hold.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from . import stats
from .matrix import Case

# The per-group metrics summarised, in summary.csv's column order.
GROUP_METRICS = (
    "bytes_accepted", "bytes_delivered", "send_calls", "eagain", "send_s", "blocked_s", "wall_s",
    "cpu_s", "goodput_bps", "connect_s", "latency_ms.p50", "latency_ms.p99", "tcp.rtt_ms",
    "tcp.retrans",
)
SERVER_METRICS = ("bytes_received", "cpu_s", "max_concurrent")
_STATISTICS = ("mean", "stdev", "ci95_low", "ci95_high")


@dataclass(frozen=True)
class Metric:
    """One metric of one case: its value in each ok repetition that has it, and their summary."""

    values: tuple[float, ...]
    summary: stats.Summary

    def scaled(self, scale: float) -> "Metric":
        """The same metric in another unit (the summary of the scaled values)."""
        return Metric(tuple(v * scale for v in self.values), stats.summarize(v * scale for v in self.values))


@dataclass(frozen=True)
class CaseSummary:
    """A case's repetitions: how many ran, how many failed, and each metric over the ok ones.

    ``metrics`` holds every metric the case's roles offer, in column order,
    with an empty summary where no repetition had a value.
    """

    case: Case
    runs: int
    failed: int
    metrics: Mapping[str, Metric]

    def metric(self, name: str) -> Metric | None:
        """``name`` (``GROUP.FIELD``, ``server.FIELD``, ``case.wall_s``), or None if no
        repetition has a value for it."""
        found = self.metrics.get(name)
        return found if found is not None and found.summary.n else None


@dataclass(frozen=True)
class RunSummary:
    """Every case's summary, in case order."""

    cases: tuple[CaseSummary, ...]
    _by_id: Mapping[str, CaseSummary] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {c.case.id: c for c in self.cases})  # frozen: set once here

    def get(self, case_id: str) -> CaseSummary | None:
        """The summary of the case with this id, or None if the run has no such case."""
        return self._by_id.get(case_id)

    def has(self, name: str) -> bool:
        """True if any case has a value for metric ``name``."""
        return any(c.metric(name) is not None for c in self.cases)

    def csv_text(self) -> str:
        """summary.csv's text: parameters, runs, failed, then mean/stdev/CI of each metric."""
        param_keys = list(dict.fromkeys(k for c in self.cases for k in c.case.params))
        rows = []
        for c in self.cases:
            row = {"case": c.case.id, **{k: str(c.case.params.get(k, "")) for k in param_keys},
                   "runs": str(c.runs), "failed": str(c.failed)}
            for name, metric in c.metrics.items():
                for statistic in _STATISTICS:
                    row[f"{name}.{statistic}"] = _fmt(getattr(metric.summary, statistic))
            rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()


def summarize_run(cases: Sequence[Case], records: Iterable[Mapping[str, Any]]) -> RunSummary:
    """The summary of every case over its records (see the module's docstring)."""
    by_case: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_case.setdefault(record["case"], []).append(record)
    summaries = []
    for case in cases:
        runs = by_case.get(case.id, [])
        ok = [r for r in runs if r["status"] == "ok"]
        names = ["case.wall_s", *(f"server.{m}" for m in SERVER_METRICS),
                 *(f"{g.name}.{m}" for g in case.experiment.clients for m in GROUP_METRICS)]
        series: dict[str, list[float]] = {name: [] for name in names} if ok else {}
        for record in ok:
            values = stats.case_values(record)
            for name in series:
                if values.get(name) is not None:
                    series[name].append(float(values[name]))
        metrics = {name: Metric(tuple(v), _as_in_csv(stats.summarize(v))) for name, v in series.items()}
        summaries.append(CaseSummary(case, len(runs), len(runs) - len(ok), metrics))
    return RunSummary(tuple(summaries))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.10g}"


def _as_in_csv(summary: stats.Summary) -> stats.Summary:
    """The summary at summary.csv's precision, so that every table shows what the file
    holds (and the spread of equal values is 0, not a rounding error of 1e-19)."""
    def rounded(value: float | None) -> float | None:
        return None if value is None else float(_fmt(value))
    return stats.Summary(summary.n, rounded(summary.mean), rounded(summary.stdev), rounded(summary.ci95_low),
                         rounded(summary.ci95_high))
