"""report.md and plots/ from a run directory alone: what ran, the tables, the
expectations, the pictures.

Reads only the run directory's files (experiment.yaml, meta.json, cases.jsonl,
traces/, captures/), so a run can be re-reported on another machine without
Docker. What a capture says of TCP is in its record; only the time–sequence
plot reads the pcaps themselves.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from . import linkcheck, markdown
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


def _count(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless one: "12 retransmitted segments"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def _bytes_text(value: float) -> str:
    """A byte count in decimal units, three significant digits: "1.4 MB"."""
    for divisor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= divisor:
            return f"{value / divisor:.3g} {unit}"
    return f"{value:,.0f} B"


def _cap_text(cap_bytes: int) -> str:
    """The capture's cap as it was set: whole MiB where it is, else bytes."""
    if cap_bytes and cap_bytes % 2 ** 20 == 0:
        return f"{cap_bytes // 2 ** 20:,} MiB"
    return f"{cap_bytes:,} B"


def capture_text(capture: Mapping[str, Any]) -> str:
    """A role's capture in one line: packets, retransmissions, when data flowed, payload, FIN; what the cap cut.

    From the record alone (its ``tcp`` summary), so a report needs no pcap.
    """
    parts = [_count(capture.get("packets") or 0, "packet")]
    tcp = capture.get("tcp")
    if isinstance(tcp, Mapping):
        parts.append(_count(tcp.get("retransmitted_segments") or 0, "retransmitted segment"))
        if tcp.get("first_data_s") is not None:
            parts.append(f"data from {_seconds(tcp['first_data_s'])} to {_seconds(tcp['last_data_s'])}")
        else:
            parts.append("no data")
        payload = tcp.get("payload_bytes") or {}
        to_server, from_server = payload.get("to_server") or 0, payload.get("from_server") or 0
        parts.append(f"{to_server:,} payload bytes to the server"
                     + (f", {from_server:,} from it" if from_server else ""))
        fin = tcp.get("fin") or {}
        both = {True: {True: "FIN seen both ways", False: "FIN seen to the server only"},
                False: {True: "FIN seen from the server only", False: "no FIN seen"}}
        parts.append(both[bool(fin.get("to_server"))][bool(fin.get("from_server"))])
    else:
        # Why the packets were not read (a torn file, or none kept), where the record says.
        parts.append(f"not decoded ({capture['error']})" if capture.get("error") else "not decoded")
    text = ", ".join(parts)
    cut = []
    if capture.get("cut_packets"):
        cut.append(f"{capture['cut_packets']:,} packets ({_bytes_text(capture.get('cut_bytes') or 0)}) "
                   f"cut at the {_cap_text(capture.get('cap_bytes') or 0)} cap")
    if capture.get("dropped_by_kernel"):
        cut.append(f"{_count(capture['dropped_by_kernel'], 'packet')} dropped by the kernel before the capture")
    return text + "".join(f"; {c}" for c in cut)


def _first_records(records: Sequence[Mapping[str, Any]], has: Any) -> dict[str, Mapping[str, Any]]:
    """Per case, its first repetition (that ran to the end, if one did) for which ``has`` holds."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if not has(record):
            continue
        best = chosen.get(record["case"])
        rank = (record["status"] != "ok", record["repetition"])
        if best is None or rank < (best["status"] != "ok", best["repetition"]):
            chosen[record["case"]] = record
    return chosen


def _has_capture(record: Mapping[str, Any]) -> bool:
    return isinstance((record.get("server") or {}).get("capture"), Mapping) or any(
        isinstance(c.get("capture"), Mapping) for c in record.get("clients") or ())


def _has_measured(record: Mapping[str, Any]) -> bool:
    return bool((record.get("link") or {}).get("measured"))


def _packet_lines(cases: Sequence[Case], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per case, a line per captured role and per measured link, from the case's first repetition
    that has them; nothing when the run captured and measured nothing."""
    captured, measured = _first_records(records, _has_capture), _first_records(records, _has_measured)
    lines = []
    for case in cases:
        record = captured.get(case.id)
        if record is not None:
            roles = [(f"client {c['name']}" + (f"#{c['replica']}" if c.get("replica") else ""), c)
                     for c in record.get("clients") or ()]
            for role, entry in [*roles, ("server", record.get("server") or {})]:
                if isinstance(entry.get("capture"), Mapping):
                    lines.append(f"- `{case.id}` r{record['repetition']}: capture ({role}): "
                                 f"{capture_text(entry['capture'])}")
        record = measured.get(case.id)
        if record is not None:
            for key, verdict in record["link"]["measured"].items():
                lines.append(f"- `{case.id}` r{record['repetition']}: link measured ({key}): "
                             f"{linkcheck.verdict_text(verdict)}")
            off = [r["repetition"] for r in records if r["case"] == case.id and r.get("link_ok") is False
                   and r["repetition"] != record["repetition"]]
            if off:
                lines.append(f"- `{case.id}`: the link was off in r{', r'.join(map(str, sorted(off)))} as well")
    if not lines:
        return []
    return ["### Captures and measured links", "",
            "Each case's first repetition that captured packets (headers only; lengths from the IP and TCP "
            "headers) or probed its links before the workload.", "", *lines, ""]


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
    lines += _packet_lines(cases, case_records)
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
