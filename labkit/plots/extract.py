"""Extraction: what the plots show, taken from a loaded run. Pure functions, no drawing.

A trace's records become a send timeline, request latencies or send-queue
samples; the run's summary becomes bars with their confidence intervals; the
matrix decides which line goes into which panel.
"""

from __future__ import annotations

import bisect
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from socklab.trace import read_trace

from ..matrix import Case, format_value
from ..rundir import LoadedRun

# asyncio's write() is its send(); a program of the user's may send by any of the socket's sends.
ACCEPTING_CALLS = ("send", "write", "sendall", "sendto", "sendmsg")
_REFUSED = ("EAGAIN", "EWOULDBLOCK")

TraceLoader = Callable[[Path], "list[dict] | None"]


# -------------------------------------------------------------- traces

def trace_loader() -> TraceLoader:
    """Reads each trace once; a missing or damaged trace reads as None."""
    cache: dict[Path, list[dict] | None] = {}

    def load(path: Path) -> list[dict] | None:
        if path not in cache:
            try:
                cache[path] = read_trace(str(path))[1]
            except (OSError, EOFError, ValueError, KeyError, zlib.error, gzip.BadGzipFile):
                cache[path] = None
        return cache[path]

    return load


@dataclass(frozen=True)
class SendTimeline:
    """One client's socket calls as a picture of its sending.

    ``steps_s``/``steps_bytes``: the cumulative bytes send() accepted, as a
    step function of time (seconds since the client started); ``calls``:
    ``(start_s, end_s, level_bytes)`` for every socket call and wait, at the
    level reached when it began; ``refused``: ``(t_s, level_bytes, attempts)``
    of sends that met EAGAIN; ``send_calls`` counts every attempt, merged
    busy-loop retries included.
    """

    steps_s: tuple[float, ...]
    steps_bytes: tuple[int, ...]
    calls: tuple[tuple[float, float, int], ...]
    refused: tuple[tuple[float, int, int], ...]
    send_calls: int
    refused_calls: int
    accepted_bytes: int
    last_accept_s: float | None


def send_timeline(records: Sequence[Mapping[str, Any]]) -> SendTimeline:
    """The send timeline of one trace's records (see :class:`SendTimeline`)."""
    calls = [r for r in records if r["call"] != "outq"]
    # A call's bytes count once it returns; with threads, calls overlap, so
    # the level at any moment is what the calls finished by then accepted.
    accepts = sorted((r["t_s"] + r["dur_s"], r["returned"]) for r in calls
                     if r["call"] in ACCEPTING_CALLS and r["returned"] > 0)
    ends = [end for end, _ in accepts]
    totals = []
    running = 0
    for _, returned in accepts:
        running += returned
        totals.append(running)

    def level_at(t_s: float) -> int:
        i = bisect.bisect_right(ends, t_s)
        return totals[i - 1] if i else 0

    start_s = calls[0]["t_s"] if calls else 0.0
    end_s = max((r["t_s"] + r["dur_s"] for r in calls), default=start_s)
    xs, ys = [start_s], [0]
    for end, total in zip(ends, totals):
        xs += [end, end]
        ys += [ys[-1], total]
    xs.append(end_s)
    ys.append(ys[-1])
    sends = [r for r in calls if r["call"] in ACCEPTING_CALLS]
    refused = tuple((r["t_s"], level_at(r["t_s"]), r["n"]) for r in sends if r["errno"] in _REFUSED)
    return SendTimeline(
        steps_s=tuple(xs), steps_bytes=tuple(ys),
        calls=tuple((r["t_s"], r["t_s"] + r["dur_s"], level_at(r["t_s"])) for r in calls),
        refused=refused, send_calls=sum(r["n"] for r in sends),
        refused_calls=sum(n for _, _, n in refused), accepted_bytes=running,
        last_accept_s=ends[-1] if ends else None)


def level_at_s(timeline: SendTimeline, t_s: float) -> int:
    """Bytes the timeline's sends had accepted by ``t_s``."""
    i = bisect.bisect_right(timeline.steps_s, t_s)
    return timeline.steps_bytes[i - 1] if i else 0


def request_latencies_s(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each echo request's round trip, rebuilt from its connection's calls.

    A request starts with the first send after the previous reply and ends
    when recv() has returned every byte its sends accepted: the same span the
    client times (from before its send to after the last byte of the echo).
    A shutdown ends the requests, so the server's closing byte count is not
    taken for an echo.
    """
    pending: dict[int, tuple[float, int]] = {}
    latencies = []
    for r in records:
        conn, call = r["conn"], r["call"]
        if call in ACCEPTING_CALLS:
            start_s, awaited = pending.get(conn, (r["t_s"], 0))
            pending[conn] = (start_s, awaited + max(r["returned"], 0))
        elif call == "shutdown":
            pending.pop(conn, None)
        elif call == "recv" and r["returned"] > 0 and conn in pending:
            start_s, awaited = pending[conn]
            awaited -= r["returned"]
            if awaited > 0:
                pending[conn] = (start_s, awaited)
            else:
                latencies.append(r["t_s"] + r["dur_s"] - start_s)
                del pending[conn]
    return latencies


def send_queue_samples(records: Sequence[Mapping[str, Any]]) -> dict[int, tuple[list[float], list[int]]]:
    """SIOCOUTQ samples per connection: ``{conn: (times_s, queued_bytes)}``."""
    samples: dict[int, tuple[list[float], list[int]]] = {}
    for r in records:
        if r["call"] == "outq":
            times, queued = samples.setdefault(r["conn"], ([], []))
            times.append(r["t_s"])
            queued.append(r["returned"])
    return samples


def moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred moving mean over ``window`` values (fewer at the ends), so that
    the smoothed line does not lag behind the samples."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    half = window // 2
    means = []
    for i in range(len(values)):
        low, high = max(0, i - half), min(len(values), i - half + window)
        means.append((prefix[high] - prefix[low]) / (high - low))
    return means


# ------------------------------------------------------------- records

@dataclass(frozen=True)
class Bar:
    """One bar: a case's metric for one client group (or the server) in one run."""

    row: str
    run: int
    mode: str
    mean: float | None
    ci95_low: float | None
    ci95_high: float | None
    values: tuple[float, ...]
    note: str = ""


def metric_bars(run: LoadedRun, run_index: int, owner: str, metric: str, scale: float = 1.0) -> list[Bar]:
    """A bar per case for ``owner.metric`` (``owner`` a client group or "server").

    From the run's summary (the repetitions that ran to the end, as
    summary.csv has them); the bar's colour is the owner's mode in that case.
    Cases without the group give no bar.
    """
    bars = []
    for case in run.cases:
        if owner == "server":
            mode = case.experiment.server.mode
        elif any(g.name == owner for g in case.experiment.clients):
            mode = case.experiment.group(owner).mode
        else:
            continue
        summary = run.summary.get(case.id)
        found = summary.metric(f"{owner}.{metric}") if summary is not None else None
        if found is None:
            bars.append(Bar(row=case.id, run=run_index, mode=mode, mean=None, ci95_low=None, ci95_high=None,
                            values=()))
            continue
        found = found.scaled(scale) if scale != 1.0 else found
        bars.append(Bar(row=case.id, run=run_index, mode=mode, mean=found.summary.mean,
                        ci95_low=found.summary.ci95_low, ci95_high=found.summary.ci95_high, values=found.values))
    return bars


def bar_rows(runs: Sequence[LoadedRun]) -> list[str]:
    """The case ids the bars are drawn for, first run's order first."""
    return list(dict.fromkeys(case.id for run in runs for case in run.cases))


def client_groups(runs: Sequence[LoadedRun]) -> list[str]:
    """Every client group's name, in the order the runs name them."""
    return list(dict.fromkeys(g.name for run in runs for case in run.cases for g in case.experiment.clients))


# --------------------------------------------------- which trace, which panel

@dataclass(frozen=True)
class TraceRef:
    """Where one client container's trace of one repetition is, and what it ran."""

    case: Case
    repetition: int
    group: str
    replica: int
    mode: str
    workload: str
    path: Path


def trace_refs(run: LoadedRun) -> list[TraceRef]:
    """Every kept client trace of the repetitions that ran to the end, in record order."""
    by_id = {case.id: case for case in run.cases}
    refs = []
    for record in run.records:
        case = by_id.get(record["case"])
        if case is None or record["status"] != "ok":
            continue
        for client in record["clients"]:
            path = run.trace_path(client)
            if path is None:
                continue
            group = case.experiment.group(client["name"])
            refs.append(TraceRef(case, record["repetition"], client["name"], client["replica"],
                                 client.get("mode") or group.mode, group.workload.kind, path))
    return refs


def first_traces(refs: Iterable[TraceRef]) -> list[TraceRef]:
    """One trace per case and group: the first replica of the first repetition."""
    chosen: dict[tuple[str, str], TraceRef] = {}
    for ref in refs:
        key = (ref.case.id, ref.group)
        best = chosen.get(key)
        if best is None or (ref.repetition, ref.replica) < (best.repetition, best.replica):
            chosen[key] = ref
    return list(chosen.values())


def line_param(cases: Sequence[Case], group: str, prefer: str) -> str | None:
    """The swept mode (or program) that the lines of one panel differ by (their colour shows it).

    ``prefer`` is "client" (the group's mode first, then the server's) or
    "server" (the other way round); None when neither is swept, and every
    case then gets a panel of its own.
    """
    swept = {k for case in cases for k in case.params}
    # A program's file is its role's mode: sweeping it sweeps the mode.
    candidates = [f"clients.{group}.mode", f"clients.{group}.program.path", "server.mode", "server.program.path"]
    if prefer == "server":
        candidates.reverse()
    return next((k for k in candidates if k in swept), None)


def line_identity(ref: TraceRef, key: str | None, prefer: str) -> tuple[str, str]:
    """A line's mode (its colour) and label: the swept mode, or the preferred role's."""
    role = "server" if key in ("server.mode", "server.program.path") or (key is None and prefer == "server") \
        else "client"
    mode = ref.case.experiment.server.mode if role == "server" else ref.mode
    return mode, f"{mode} {role}"


def panel_title(case: Case, group: str, line_key: str | None, several_groups: bool) -> str:
    """The panel a case's line goes in: every swept value but the line's own."""
    parts = [f"{k.removeprefix('clients.')}={format_value(v)}" for k, v in case.params.items()
             if k != line_key]
    if several_groups:
        parts.insert(0, f"group {group}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Placed:
    """A trace placed in a figure: its panel's title, its line's mode and label."""

    ref: TraceRef
    run: int
    title: str
    mode: str
    label: str


def placed_traces(runs: Sequence[LoadedRun], prefer: str, *, first_only: bool,
                  workloads: Sequence[str] | None = None, skip: Sequence[str] = ()) -> Iterable[Placed]:
    """Each kept trace of the runs (or each case's first, ``first_only``) with the panel
    and line it belongs to; only ``workloads`` if given, never those in ``skip``.

    ``prefer`` says whose mode the lines differ by where the matrix does not
    say (see :func:`line_param`).
    """
    for index, run in enumerate(runs):
        several_groups = len({g.name for c in run.cases for g in c.experiment.clients}) > 1
        refs = trace_refs(run)
        for ref in first_traces(refs) if first_only else refs:
            if (workloads is not None and ref.workload not in workloads) or ref.workload in skip:
                continue
            key = line_param(run.cases, ref.group, prefer=prefer)
            mode, label = line_identity(ref, key, prefer=prefer)
            yield Placed(ref, index, panel_title(ref.case, ref.group, key, several_groups), mode,
                         run_label(run) + label)


def run_label(run: LoadedRun) -> str:
    """What a line's label starts with in a comparison ("A · "), nothing in a report."""
    return f"{run.label} · " if run.label is not None else ""
