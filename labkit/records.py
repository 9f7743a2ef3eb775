"""Case records (schema 1) and the summary over repetitions: pure functions.

A record is assembled from what the containers printed (their result lines),
so the same function serves a live run and tests; expectations are evaluated
on the finished record, and ``summary.csv`` is computed from records alone.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Mapping, Sequence

from . import stats
from .config import Experiment
from .matrix import Case

SCHEMA = 1

# The per-group metrics summary.csv reports, in column order.
SUMMARY_METRICS = (
    "bytes_accepted", "bytes_delivered", "send_calls", "eagain", "send_s", "blocked_s", "wall_s",
    "cpu_s", "goodput_bps", "connect_s", "latency_ms.p50", "latency_ms.p99", "tcp.rtt_ms",
    "tcp.retrans",
)
SERVER_METRICS = ("bytes_received", "cpu_s", "max_concurrent")
# Client result fields every record carries (null where they do not apply).
CLIENT_FIELDS = (
    "mode", "workload", "bytes_requested", "bytes_accepted", "bytes_delivered", "send_calls",
    "eagain", "blocked_s", "wall_s", "cpu_s", "goodput_bps", "connect_s", "latency_ms", "tcp",
)
SERVER_FIELDS = ("mode", "connections", "bytes_received", "cpu_s", "max_concurrent")
_RESULT_META = ("socklab_result", "role")


def _strip(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _RESULT_META}


def client_record(group: str, replica: int, result: Mapping[str, Any] | None) -> dict[str, Any]:
    """One client container's entry in ``clients``: every schema field, then the rest."""
    result = _strip(result or {})
    entry: dict[str, Any] = {"name": group, "replica": replica}
    entry.update({field: result.pop(field, None) for field in CLIENT_FIELDS})
    entry.update(result)
    return entry


def server_record(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``server`` object: schema fields first, then the rest (per-connection bytes)."""
    if result is None:
        return None
    rest = _strip(result)
    entry = {field: rest.pop(field, None) for field in SERVER_FIELDS}
    entry.update(rest)
    return entry


def evaluate_expectations(experiment: Experiment, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every expectation that applies to this case, evaluated on its record."""
    values = stats.case_values(record)
    results = []
    for expectation in experiment.expect:
        if not expectation.applies_to(experiment):
            continue
        evaluation = expectation.check.evaluate(values)
        results.append({"name": expectation.name, "check": expectation.check.text,
                        "passed": bool(evaluation.passed), "observed": dict(evaluation.observed),
                        "error": evaluation.error})
    return results


def case_record(
    *, case: Case, repetition: int, status: str, error: str | None, wall_s: float,
    link: Mapping[str, Any], server: Mapping[str, Any] | None,
    clients: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """A complete ``cases.jsonl`` record; expectations evaluated when the case ran."""
    record: dict[str, Any] = {
        "schema": SCHEMA, "experiment": case.experiment.name, "case": case.id,
        "params": dict(case.params), "repetition": repetition, "status": status, "error": error,
        "wall_s": round(wall_s, 6), "link": dict(link), "server": server, "clients": list(clients),
        "expectations": [],
    }
    if status == "ok":
        record["expectations"] = evaluate_expectations(case.experiment, record)
    return record


def record_passed(record: Mapping[str, Any]) -> bool:
    """The case ran and every expectation held."""
    return record["status"] == "ok" and all(e["passed"] for e in record["expectations"])


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.10g}"


def summary_rows(cases: Sequence[Case], records: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row per case: its parameters, then mean/stdev/CI of each metric over repetitions.

    Only repetitions that ran to the end (status ok) are summarised; ``runs``
    and ``failed`` say how many there were of each.
    """
    by_case: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_case.setdefault(record["case"], []).append(record)
    param_keys = list(dict.fromkeys(k for c in cases for k in c.params))
    rows = []
    for case in cases:
        runs = by_case.get(case.id, [])
        ok = [r for r in runs if r["status"] == "ok"]
        row = {"case": case.id, **{k: str(case.params.get(k, "")) for k in param_keys},
               "runs": str(len(runs)), "failed": str(len(runs) - len(ok))}
        series: dict[str, list[float | None]] = {}
        for record in ok:
            values = stats.case_values(record)
            series.setdefault("case.wall_s", []).append(values.get("case.wall_s"))
            for metric in SERVER_METRICS:
                series.setdefault(f"server.{metric}", []).append(values.get(f"server.{metric}"))
            for group in case.experiment.clients:
                for metric in SUMMARY_METRICS:
                    series.setdefault(f"{group.name}.{metric}", []).append(
                        values.get(f"{group.name}.{metric}"))
        for name, values in series.items():
            summary = stats.summarize(values)
            row[f"{name}.mean"] = _fmt(summary.mean)
            row[f"{name}.stdev"] = _fmt(summary.stdev)
            row[f"{name}.ci95_low"] = _fmt(summary.ci95_low)
            row[f"{name}.ci95_high"] = _fmt(summary.ci95_high)
        rows.append(row)
    return rows


def summary_csv(cases: Sequence[Case], records: Iterable[Mapping[str, Any]]) -> str:
    """summary.csv's text."""
    rows = summary_rows(cases, records)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
