"""report.md from a run directory alone: what ran, the tables, the expectations.

Reads only the run directory's files (experiment.yaml, meta.json, cases.jsonl),
so a run can be re-reported on another machine without Docker.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from . import records
from .config import load_experiment
from .matrix import Case, expand_cases
from .rundir import RunDir

# (column, metric, scale, unit) shown per client group in the case table.
_GROUP_COLUMNS = (
    ("accepted", "bytes_accepted", 1, "B"),
    ("delivered", "bytes_delivered", 1, "B"),
    ("send calls", "send_calls", 1, ""),
    ("EAGAIN", "eagain", 1, ""),
    ("blocked", "blocked_s", 1, "s"),
    ("CPU", "cpu_s", 1, "s"),
    ("goodput", "goodput_bps", 1e-6, "Mbit/s"),
    ("p99 latency", "latency_ms.p99", 1, "ms"),
)


def _cell(row: Mapping[str, str], name: str, scale: float) -> str:
    mean = row.get(f"{name}.mean", "")
    if mean == "":
        return "–"
    value = float(mean) * scale
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    low, high = row.get(f"{name}.ci95_low", ""), row.get(f"{name}.ci95_high", "")
    if low and high:
        half = (float(high) - float(low)) / 2 * scale
        text += f" ± {half:.2g}"
    return text


def render(experiment_name: str, description: str, meta: Mapping[str, Any], cases: Sequence[Case],
           case_records: Sequence[Mapping[str, Any]]) -> str:
    """The report's Markdown."""
    rows = records.summary_rows(cases, case_records)
    lines = [f"# {experiment_name}", "", description, "",
             "## Engine", "",
             f"- kernel {meta.get('host_kernel', '?')}, Docker {meta.get('docker', {}).get('engine', '?')}, "
             f"Compose {meta.get('compose', '?')}",
             f"- shaping backend: {meta.get('shaping_backend', '?')}",
             f"- lab {meta.get('lab_version', '?')} at revision {meta.get('git_revision', '?')}",
             f"- started {meta.get('started_at', '?')}, ended {meta.get('ended_at', 'not yet')}", ""]
    lines += ["## Cases", "", "Means over the repetitions that ran to the end, ± half the 95 % "
              "confidence interval where there were several.", ""]
    groups = list(dict.fromkeys(g.name for c in cases for g in c.experiment.clients))
    for group in groups:
        header = ["case", "runs", *[f"{label}" + (f" ({unit})" if unit else "")
                                    for label, _, _, unit in _GROUP_COLUMNS]]
        lines += [f"### Client group `{group}`", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for row in rows:
            cells = [f"`{row['case']}`", f"{row['runs']} ({row['failed']} failed)" if row["failed"] != "0"
                     else row["runs"]]
            cells += [_cell(row, f"{group}.{metric}", scale) for _, metric, scale, _ in _GROUP_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Expectations", ""]
    any_expectation = False
    for record in case_records:
        for e in record.get("expectations") or ():
            any_expectation = True
            mark = "held" if e["passed"] else "**did not hold**"
            observed = ", ".join(f"{k} = {v}" for k, v in e["observed"].items())
            why = f" ({e['error']})" if e.get("error") else ""
            lines.append(f"- `{record['case']}` r{record['repetition']}: {e['name']} — {mark}{why}; "
                         f"observed {observed}")
    if not any_expectation:
        lines.append("No expectation applied to the cases that ran.")
    failures = [r for r in case_records if r["status"] != "ok"]
    if failures:
        lines += ["", "## Cases that did not finish", ""]
        lines += [f"- `{r['case']}` r{r['repetition']}: {r['status']} — {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def write_report(rundir: RunDir) -> None:
    """Rebuild summary.csv and report.md from the run directory's own files."""
    experiment = load_experiment(rundir.path / "experiment.yaml")
    cases = expand_cases(experiment)
    case_records = rundir.read_cases()
    rundir.write_text("summary.csv", records.summary_csv(cases, case_records))
    rundir.write_text("report.md", render(experiment.name, experiment.description, rundir.read_meta(),
                                          cases, case_records))
