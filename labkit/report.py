"""report.md and plots/ from a run directory alone: what ran, the tables, the
expectations, the pictures.

Reads only the run directory's files (experiment.yaml, meta.json, cases.jsonl,
traces/), so a run can be re-reported on another machine without Docker.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from . import markdown
from .config import ClientGroup, LinkConfig, Program
from .matrix import Case
from .rundir import LoadedRun, RunDir
from .summary import RunSummary

if TYPE_CHECKING:
    from . import plots

# The metrics of the case tables, per client group and the server's.
# A column no case has a value in (latency in a bulk run) is left out.
_GROUP_COLUMNS = ("bytes_accepted", "bytes_delivered", "send_calls", "eagain", "send_s", "blocked_s", "cpu_s",
                  "goodput_bps", "latency_ms.p50", "latency_ms.p99")
_SERVER_COLUMNS = ("server.bytes_received", "server.cpu_s", "server.max_concurrent", "case.wall_s")


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


def _program_text(program: Program) -> str:
    """A program of the user's as the report names it: what runs, and how it is traced."""
    if program.command is not None:
        run = "command `" + " ".join(program.command) + "`"
    else:
        run = "program `" + " ".join((program.script, *program.args)) + "`"
    return f"{run}, traced by {program.trace}" if program.trace != "none" else f"{run}, untraced"


def _group_text(group: ClientGroup) -> str:
    if group.program is not None:
        size = f"{group.replicas} container{'s' if group.replicas > 1 else ''}"
        return f"**{group.mode}**; {_program_text(group.program)}; link {_link_text(group.link)}; {size}"
    workload = group.workload.to_dict()
    kind = workload.pop("kind")
    size = f"{group.replicas} container{'s' if group.replicas > 1 else ''} × {group.connections} " \
           f"connection{'s' if group.connections > 1 else ''}"
    return (f"**{group.mode}**; {kind} ({_settings_text(workload)}); link {_link_text(group.link)}; {size}")


def _case_lines(cases: Sequence[Case]) -> list[str]:
    """What every case ran: server and client groups as resolved for it."""
    groups = list(dict.fromkeys(g.name for c in cases for g in c.experiment.clients))
    rows = []
    for case in cases:
        server = case.experiment.server
        own = _program_text(server.program) if server.program is not None else f"recv {server.recv_size_bytes} B"
        cells = [str(case.index + 1), f"`{case.id}`", f"**{server.mode}**; {own}; link {_link_text(server.link)}"]
        by_name = {g.name: g for g in case.experiment.clients}
        rows.append(cells + [_group_text(by_name[g]) if g in by_name else markdown.MISSING for g in groups])
    return markdown.table(["#", "case", "server", *[f"group `{g}`" for g in groups]], rows)


def _metric_table(summary: RunSummary, columns: Sequence[str], prefix: str) -> list[str]:
    """A case-per-row table of mean ± CI half-width; columns with no value anywhere left out."""
    shown = [markdown.SHOWN[c] for c in columns if summary.has(f"{prefix}{c}")]
    header = ["case", "runs", *[s.title(s.column) for s in shown]]
    rows = []
    for case in summary.cases:
        cells = [f"`{case.case.id}`", f"{case.runs} ({case.failed} failed)" if case.failed else str(case.runs)]
        for s in shown:
            found = case.metric(f"{prefix}{s.metric}")
            cells.append(markdown.mean_ci(found.summary if found else None, s.scale))
        rows.append(cells)
    return markdown.table(header, rows)


def _observed_text(observed: Mapping[str, Any]) -> str:
    def number(v: Any) -> str:
        if isinstance(v, float) and not v.is_integer() and abs(v) < 1e4:
            return f"{v:.6g}"
        return f"{v:,.0f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return ", ".join(f"{k} = {number(v)}" for k, v in observed.items())


def render(run: LoadedRun, plot_files: Sequence[plots.PlotFile] = ()) -> str:
    """The report's Markdown; ``plot_files`` are embedded from plots/ by relative path."""
    meta, cases, case_records = run.meta, run.cases, run.records
    docker = meta.get("docker", {})
    lines = [f"# {run.experiment.name}", "", run.experiment.description, "",
             "## Engine", "",
             f"- kernel {meta.get('host_kernel', '?')}, Docker {docker.get('engine', '?')} "
             f"(API {docker.get('api', '?')}), Compose {meta.get('compose', '?')}",
             f"- shaping backend: {markdown.shaping_text(meta.get('shaping_backend'))}",
             f"- lab {meta.get('lab_version', '?')} at revision {meta.get('git_revision', '?')}",
             f"- started {meta.get('started_at', '?')}, ended {meta.get('ended_at', 'not yet')}", ""]
    experiment = cases[0].experiment if cases else None  # as resolved for a case
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
        lines += [f"### Client group `{group}`", "", *_metric_table(run.summary, _GROUP_COLUMNS, f"{group}."), ""]
    lines += ["### Server", "", *_metric_table(run.summary, _SERVER_COLUMNS, ""), ""]
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
        lines += ["", *markdown.plots_section(plot_files)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(rundir: RunDir, draw: bool = True) -> list[plots.PlotFile]:
    """Rebuild summary.csv, plots/*.png (unless not ``draw``) and report.md from the run directory's own files.

    Returns the plots that were drawn (those the run has data for).
    """
    run = rundir.load()
    rundir.write_text("summary.csv", run.summary.csv_text())
    drawn = []
    if draw:
        # Imported here: matplotlib alone takes seconds to load on a slow machine.
        from . import plots

        drawn = plots.draw_plots([run], rundir.path / "plots")
    rundir.write_text("report.md", render(run, drawn))
    return drawn
