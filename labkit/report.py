"""report.md and plots/ from a run directory alone: what ran, the tables, the
expectations, the pictures.

Reads only the run directory's files (experiment.yaml, meta.json, cases.jsonl,
traces/), so a run can be re-reported on another machine without Docker.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from . import plots, records
from .config import ClientGroup, LinkConfig, load_experiment
from .matrix import Case, expand_cases
from .rundir import RunDir

# (column, metric, scale, unit) shown per client group in the case table.
# A column no case has a value in (latency in a bulk run) is left out.
_GROUP_COLUMNS = (
    ("accepted", "bytes_accepted", 1, "B"),
    ("delivered", "bytes_delivered", 1, "B"),
    ("send calls", "send_calls", 1, ""),
    ("EAGAIN", "eagain", 1, ""),
    ("in send()", "send_s", 1, "s"),
    ("blocked", "blocked_s", 1, "s"),
    ("CPU", "cpu_s", 1, "s"),
    ("goodput", "goodput_bps", 1e-6, "Mbit/s"),
    ("p50 latency", "latency_ms.p50", 1, "ms"),
    ("p99 latency", "latency_ms.p99", 1, "ms"),
)
_SERVER_COLUMNS = (
    ("received", "server.bytes_received", 1, "B"),
    ("CPU", "server.cpu_s", 1, "s"),
    ("max concurrent", "server.max_concurrent", 1, ""),
    ("case wall time", "case.wall_s", 1, "s"),
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
        text += f" ± {half:,.0f}" if half >= 1000 else f" ± {half:.2g}"
    return text


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _settings_text(settings: Mapping[str, Any]) -> str:
    """Config keys and values as one line (strings quoted only when they need it)."""
    words = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            words.append(f"{key}: {_settings_text(value)}")
        elif isinstance(value, str) and value.isprintable() and value.strip() == value:
            words.append(f"{key} {value}")
        else:
            words.append(f"{key} {json.dumps(value)}")
    return ", ".join(words)


def _link_text(link: LinkConfig) -> str:
    settings = {k: v for k, v in link.to_dict().items() if not (k == "backend" and v == "auto")}
    return _settings_text(settings) if link.is_shaped else "unshaped"


def _group_text(group: ClientGroup) -> str:
    workload = group.workload.to_dict()
    kind = workload.pop("kind")
    size = f"{group.replicas} container{'s' if group.replicas > 1 else ''} × {group.connections} " \
           f"connection{'s' if group.connections > 1 else ''}"
    return (f"**{group.mode}**; {kind} ({_settings_text(workload)}); link {_link_text(group.link)}; {size}")


def _case_lines(cases: Sequence[Case]) -> list[str]:
    """What every case ran: server and client groups as resolved for it."""
    groups = list(dict.fromkeys(g.name for c in cases for g in c.experiment.clients))
    header = ["#", "case", "server", *[f"group `{g}`" for g in groups]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        server = case.experiment.server
        cells = [str(case.index + 1), f"`{case.id}`",
                 f"**{server.mode}**; recv {server.recv_size_bytes} B; link {_link_text(server.link)}"]
        by_name = {g.name: g for g in case.experiment.clients}
        cells += [_group_text(by_name[g]) if g in by_name else "–" for g in groups]
        lines.append("| " + " | ".join(_table_cell(c) for c in cells) + " |")
    return lines


def _metric_table(rows: Sequence[Mapping[str, str]], columns: Sequence[tuple[str, str, float, str]],
                  prefix: str) -> list[str]:
    """A case-per-row table of mean ± CI half-width; columns with no value anywhere left out."""
    shown = [c for c in columns if any(row.get(f"{prefix}{c[1]}.mean", "") != "" for row in rows)]
    header = ["case", "runs", *[label + (f" ({unit})" if unit else "") for label, _, _, unit in shown]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['case']}`", f"{row['runs']} ({row['failed']} failed)" if row["failed"] != "0"
                 else row["runs"]]
        cells += [_cell(row, f"{prefix}{metric}", scale) for _, metric, scale, _ in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _observed_text(observed: Mapping[str, Any]) -> str:
    def number(v: Any) -> str:
        if isinstance(v, float) and not v.is_integer() and abs(v) < 1e4:
            return f"{v:.6g}"
        return f"{v:,.0f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return ", ".join(f"{k} = {number(v)}" for k, v in observed.items())


def render(experiment_name: str, description: str, meta: Mapping[str, Any], cases: Sequence[Case],
           case_records: Sequence[Mapping[str, Any]], plot_files: Sequence[plots.PlotFile] = ()) -> str:
    """The report's Markdown; ``plot_files`` are embedded from plots/ by relative path."""
    rows = records.summary_rows(cases, case_records)
    docker = meta.get("docker", {})
    lines = [f"# {experiment_name}", "", description, "",
             "## Engine", "",
             f"- kernel {meta.get('host_kernel', '?')}, Docker {docker.get('engine', '?')} "
             f"(API {docker.get('api', '?')}), Compose {meta.get('compose', '?')}",
             f"- shaping backend: {meta.get('shaping_backend', '?')}",
             f"- lab {meta.get('lab_version', '?')} at revision {meta.get('git_revision', '?')}",
             f"- started {meta.get('started_at', '?')}, ended {meta.get('ended_at', 'not yet')}", ""]
    experiment = cases[0].experiment if cases else None
    lines += ["## Cases", ""]
    if experiment is not None:
        lines += [f"{len(cases)} case(s), each repeated {experiment.repeat} time(s), "
                  f"timeout {experiment.timeout_s:g} s each.", ""]
        for step in experiment.schedule:
            lines.append(f"- at {step.at_s:g} s, the link of {step.target} changes to "
                         f"{_settings_text({k: v for k, v in step.link.to_dict().items() if k != 'backend'})}")
        if experiment.schedule:
            lines.append("")
    lines += [*_case_lines(cases), ""]
    lines += ["## Results", "", "Means over the repetitions that ran to the end, ± half the 95 % "
              "confidence interval where there were several. Byte and call counts are the group's "
              "totals, times and rates its means.", ""]
    groups = list(dict.fromkeys(g.name for c in cases for g in c.experiment.clients))
    for group in groups:
        lines += [f"### Client group `{group}`", "", *_metric_table(rows, _GROUP_COLUMNS, f"{group}."), ""]
    lines += ["### Server", "", *_metric_table(rows, _SERVER_COLUMNS, ""), ""]
    lines += ["## Expectations", ""]
    checked = [(record, e) for record in case_records for e in record.get("expectations") or ()]
    if checked:
        held = sum(e["passed"] for _, e in checked)
        lines += [f"{held} of {len(checked)} checks held.", ""]
    for record, e in checked:
        mark = "held" if e["passed"] else "**did not hold**"
        why = f" ({e['error']})" if e.get("error") else ""
        lines.append(f"- `{record['case']}` r{record['repetition']}: {e['name']} — {mark}{why}; "
                     f"observed {_observed_text(e['observed'])}")
    if not checked:
        lines.append("No expectation applied to the cases that ran.")
    failures = [r for r in case_records if r["status"] != "ok"]
    if failures:
        lines += ["", "## Cases that did not finish", ""]
        lines += [f"- `{r['case']}` r{r['repetition']}: {r['status']} — {r['error']}" for r in failures]
    if plot_files:
        lines += ["", "## Plots", ""]
        for plot in plot_files:
            lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.name})", "", plot.caption, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(rundir: RunDir) -> list[plots.PlotFile]:
    """Rebuild summary.csv, plots/*.png and report.md from the run directory's own files.

    Returns the plots that were drawn (those the run has data for).
    """
    experiment = load_experiment(rundir.path / "experiment.yaml")
    cases = expand_cases(experiment)
    case_records = rundir.read_cases()
    rundir.write_text("summary.csv", records.summary_csv(cases, case_records))
    drawn = plots.draw_plots([plots.PlotRun(None, cases, case_records, rundir.traces)], rundir.path / "plots")
    rundir.write_text("report.md", render(experiment.name, experiment.description, rundir.read_meta(),
                                          cases, case_records, drawn))
    return drawn
