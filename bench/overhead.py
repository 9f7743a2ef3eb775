"""Benchmark: what the lab costs around a workload, against bare `docker compose`.

    python3 bench/overhead.py [--quick]

Per case: the lab's own case runner (the one `lab.py run` uses) runs a case
whose workload is nearly nothing (ten 1 KiB round trips per client) with 1, 10
and 50 client containers; the seconds outside the workload are the case's
whole time (override written, containers up, clients awaited, results and
traces collected, project down) minus the workload's (the longest client's
own wall time). The reference is bare Compose doing the least any tool must:
`docker compose up -d` of the same services from the same override file, then
`down`, timed in the same repetition. Its `up` waits, as compose.yaml says, for
the one-shot gate that sees the server listen before the clients start
(`server-ready`): any tool must wait for that, so the lab's own wait is not
counted as overhead (until 2026-12 the reference used `--no-deps`, when the
gate was a healthcheck that bare Compose skipped).

Sweep: a 12-case experiment (six client modes x two payloads, 4 and 8 s at 50
Mbit/s) run by the case runner twice: with containers per case (the default)
and with `--reuse` (the cases differ only in the client's arguments, so they
share one project); each sweep's wall time against the sum of its workloads.

Where a case's time goes is recorded per phase, from the runner's own
progress messages (the definition, `compose up`, the wait for the clients,
stopping the server and collecting, writing results, teardown; the link probe
and the workload from the case's record), beside the bare reference's `up`
and `down`: the results' details hold each repetition's, and a breakdown table
per section (medians per case, totals per sweep) that render.py prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import build_image, case_runner  # noqa: E402
from common import figure, Log, log_to_stderr  # noqa: E402
from labkit.compose import COMPOSE_FILE, ComposeProject  # noqa: E402
from labkit.config import Experiment, load_experiment_text  # noqa: E402
from labkit.engine import Engine  # noqa: E402
from labkit.matrix import expand_cases, expand_runs  # noqa: E402
from labkit.rundir import RunDir  # noqa: E402
from labkit import scenario  # noqa: E402

CASE_EXPERIMENT = """\
name: bench-overhead
description: Lab overhead per case with {replicas} client container(s).
timeout: 300s
server:
  mode: epoll
clients:
  - name: load
    replicas: {replicas}
    mode: blocking
    workload: {{kind: echo, requests: 10, size: 1KiB}}
"""

# Twelve cases of about 2 s each: bulk over a shaped link, the sweep a user runs
# to compare client modes and payloads. Nothing in a case changes the server.
SWEEP_EXPERIMENT = """\
name: bench-sweep
description: A 12-case sweep, to weigh the lab's overhead against its workloads.
timeout: 120s
server:
  mode: epoll
clients:
  - name: load
    mode: blocking
    workload: {kind: bulk, bytes: 24MB}
    link: {rate: 50mbit}
matrix:
  clients.load.mode: [blocking, timeout, select, poll, epoll, asyncio]
  clients.load.workload.bytes: [24MB, 48MB]
"""
# The runner's progress messages that open each phase of a case, by phase name (the first that matches).
# With containers per case, one compose up starts the server, its gate and the clients ("start containers");
# with kept containers, each case starts its roles in them ("start server", "start clients").
PHASES = (("start kept containers", "starting the containers"), ("start containers", "starting the server, then"),
          ("start server", "starting the server"), ("start clients", "starting client"), ("run", "running"),
          ("collect", "collecting results"), ("write results", "writing the results"),
          ("tear down", "tearing down"))
# The phase the benchmark opens itself, when it hands a case to the runner: the case's definition
# (its override file written) until the runner's first message.
DEFINE = "define"
# How each phase reads in BENCHMARKS.md, in the order of a case.
PHASE_LABELS = {
    DEFINE: "define the case (override file written)",
    "start kept containers": "start the kept containers (`compose up`, once per lab)",
    "start containers": "start server, gate and clients (`compose up`)",
    "start server": "start the server's role, until it listens",
    "start clients": "start the clients' roles",
    "run": "wait for the clients",
    "probe": "… of it the link probe, before each workload (longest client per case)",
    "workload": "… of it the workload (longest client per case)",
    "collect": "stop the server; collect results and traces (side by side)",
    "write results": "write results into the run directory",
    "tear down": "tear down (containers, network and volume removed)",
    "bare up": "reference: bare `compose up -d`",
    "bare down": "reference: bare `compose down`",
}


def _workload_s(record: dict) -> float:
    """The longest client's own wall time: the part of a case that is the workload."""
    return max(c["wall_s"] or 0.0 for c in record["clients"])


def _probe_s(record: dict) -> float:
    """The longest link probe the case's clients ran (0 without one): it runs before each workload.

    A case in kept containers after the first carries the first one's measurement
    (``measured_in``) and ran no probe of its own.
    """
    return max((m.get("probe_s") or 0.0 for m in record["link"].get("measured", {}).values()
                if "measured_in" not in m), default=0.0)


def _bare_up_down(override: Path, services: list[str]) -> dict[str, float]:
    """`up -d` + `down` of ``services`` (and the gate they depend on) by bare Compose, from the case's
    own override file: the seconds of each."""
    bare = ComposeProject(f"socklab-bench-bare-{time.monotonic_ns() % 10**6}", files=(COMPOSE_FILE, override))
    started = time.monotonic()
    try:
        bare.compose("up", "-d", "--no-build", *services, timeout_s=300)
        up_s = time.monotonic() - started
    finally:
        bare.down()
    return {"bare up": up_s, "bare down": time.monotonic() - started - up_s}


@dataclass(frozen=True)
class BareReference:
    """What a case's time outside its workload is held against: a bare engine doing the least with
    the case's own definition, as the run directory keeps it."""

    engine: str  # in the figure's id and label, and the log: "" for Compose, else the engine's name
    label: str
    row_key: str
    # seconds(the run directory, the repetition, the experiment, a scratch directory): the seconds, or the
    # seconds of each phase (the figure takes their sum, the breakdown each)
    seconds: Callable[[RunDir, int, Experiment, Path], float | dict[str, float]]


def _compose_seconds(rundir: RunDir, repetition: int, experiment: Experiment, scratch: Path) -> dict[str, float]:
    override = next(rundir.compose.glob(f"*r{repetition}*"))
    services = [scenario.SERVER_SERVICE] + [scenario.client_service(g) for g in experiment.clients]
    return _bare_up_down(override, services)


COMPOSE_REFERENCE = BareReference("", "bare `docker compose up -d` + `down`", "bare_up_down_s", _compose_seconds)


def per_case(replicas: int, repetitions: int, log: Log, reference: BareReference = COMPOSE_REFERENCE,
             lab_engine: Engine | None = None) -> tuple[dict, list[dict]]:
    """The overhead figure for ``replicas`` client containers on ``lab_engine`` (Compose by default),
    against ``reference``, and every repetition's timings."""
    experiment = load_experiment_text(CASE_EXPERIMENT.format(replicas=replicas), "bench-overhead.yaml")
    (case, _), = expand_runs(expand_cases(experiment))
    where = f" on a single-node {reference.engine}" if reference.engine else ""
    lab_s, bare_s, rows = [], [], []
    clock = PhaseClock()
    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir.create(Path(tmp), experiment.name)
        runner = case_runner(rundir, clock, lab_engine, trace=True)
        for repetition in range(1, repetitions + 1):
            first_mark = clock.begin_case()
            started = time.monotonic()
            record = runner.run(case, repetition)
            total_s = time.monotonic() - started
            clock.end_case()
            if record["status"] != "ok":
                raise RuntimeError(f"overhead case{where} with {replicas} clients: {record['status']}: "
                                   f"{record['error']}")
            outside_s = total_s - _workload_s(record)
            bare = reference.seconds(rundir, repetition, experiment, Path(tmp))
            bare_phases = {k: round(v, 3) for k, v in bare.items()} if isinstance(bare, dict) else {}
            bare = sum(bare.values()) if isinstance(bare, dict) else bare
            lab_s.append(outside_s)
            bare_s.append(bare)
            phases = {**clock.seconds_by_phase(first_mark), "probe": round(_probe_s(record), 3),
                      "workload": round(_workload_s(record), 3)}
            rows.append({"replicas": replicas, "repetition": repetition, "case_s": round(total_s, 3),
                         "workload_s": round(_workload_s(record), 3), "outside_s": round(outside_s, 3),
                         reference.row_key: round(bare, 3), "seconds_by_phase": phases,
                         **({"reference_by_phase": bare_phases} if bare_phases else {})})
            log(f"overhead{where}, {replicas} client container(s): case {total_s:.2f} s, outside the workload "
                f"{outside_s:.2f} s; {reference.label} {bare:.2f} s; by phase {phases} {bare_phases}")
    prefix = f"{reference.engine}." if reference.engine else ""
    return figure(f"{prefix}overhead.case.{replicas}", f"seconds per case outside the workload{where}, {replicas} "
                  f"client container(s)", "s", lab_s, reference=reference.label, reference_samples=bare_s,
                  target={"max": 1.1}), rows


class PhaseClock:
    """A progress callback that notes when each phase of each case begins."""

    def __init__(self):
        self.marks: list[tuple[float, str]] = []

    def __call__(self, text: str) -> None:
        phase = next((name for name, opening in PHASES if text.startswith(opening)), None)
        if phase:
            self.marks.append((time.monotonic(), phase))

    def begin_case(self) -> int:
        """Note that a case is handed to the runner; where its marks begin (for :meth:`seconds_by_phase`)."""
        self.marks.append((time.monotonic(), DEFINE))
        return len(self.marks) - 1

    def end_case(self) -> None:
        self.marks.append((time.monotonic(), "end"))

    def seconds_by_phase(self, since: int = 0) -> dict[str, float]:
        """Total seconds spent in each phase over every case from mark ``since`` on (all cases so far)."""
        totals: dict[str, float] = {}
        marks = self.marks[since:]
        for (at, phase), (next_at, _) in zip(marks, marks[1:]):
            if phase != "end":
                totals[phase] = totals.get(phase, 0.0) + next_at - at
        return {phase: round(seconds, 3) for phase, seconds in totals.items()}


def sweep(reuse: bool, log: Log, *, quick: bool = False) -> tuple[dict, dict]:
    """The 12-case sweep: its wall time against the sum of its workloads.

    ``quick`` sends a quarter of the bytes: the overhead then weighs four times as much.
    """
    text = SWEEP_EXPERIMENT.replace("[24MB, 48MB]", "[6MB, 12MB]") if quick else SWEEP_EXPERIMENT
    experiment = load_experiment_text(text, "bench-sweep.yaml")
    runs = expand_runs(expand_cases(experiment))
    clock = PhaseClock()
    with tempfile.TemporaryDirectory() as tmp:
        rundir = RunDir.create(Path(tmp), experiment.name)
        runner = case_runner(rundir, clock, trace=True, reuse=reuse)
        started = time.monotonic()
        records = []
        try:
            for case, repetition in runs:
                clock.begin_case()
                records.append(runner.run(case, repetition))
                clock.end_case()
        finally:
            runner.close()
        clock.end_case()
        wall_s = time.monotonic() - started
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"sweep case {bad[0]['case']}: {bad[0]['status']}: {bad[0]['error']}")
    workload_s = sum(_workload_s(r) for r in records)
    phases = {**clock.seconds_by_phase(), "probe": round(sum(_probe_s(r) for r in records), 3),
              "workload": round(workload_s, 3)}
    how = "reusing containers" if reuse else "containers per case"
    log(f"sweep of {len(records)} cases, {how}: {wall_s:.1f} s for {workload_s:.1f} s of workload "
        f"(overhead {(wall_s - workload_s) / workload_s:.0%}); by phase {phases}")
    fig = figure(f"overhead.sweep.{'reuse' if reuse else 'fresh'}",
                 f"wall time of a {len(records)}-case sweep, {how}", "s", [wall_s],
                 reference="sum of its workloads", reference_samples=[workload_s],
                 target={"max": 1.1} if reuse else None)
    return fig, {"cases": len(records), "reuse": reuse, "wall_s": round(wall_s, 2),
                 "workload_s": round(workload_s, 2), "seconds_by_phase": phases,
                 "per_case_workload_s": [round(_workload_s(r), 3) for r in records]}


def _table(caption: str, columns: list[str], by_column: list[dict[str, float | None]],
           totals: list[tuple[str, list[float | None]]]) -> dict:
    """A breakdown table as render.py prints it: a row per phase some column has (in the order of a case),
    then ``totals``."""
    phases = [phase for phase in PHASE_LABELS if any(col.get(phase) is not None for col in by_column)]
    rows = [[PHASE_LABELS[phase], [col.get(phase) for col in by_column]] for phase in phases]
    rows += [[label, values] for label, values in totals]
    return {"caption": caption, "columns": columns, "unit": "s", "rows": rows}


def breakdown(figures: list[dict], rows: list[dict], sweeps: list[dict]) -> list[dict]:
    """Where the seconds outside the workload go: per-case figures by the median of each phase over their
    repetitions (with the bare reference's own phases), sweeps by each phase's total over their cases."""
    tables = []
    cases = [f for f in figures if ".case." in f["id"]]
    if cases:
        by_replicas = [[r for r in rows if r["replicas"] == int(f["id"].rsplit(".", 1)[1])] for f in cases]

        def median_of(reps: list[dict], value: Callable[[dict], float | None]) -> float | None:
            found = [v for v in map(value, reps) if v is not None]
            return round(statistics.median(found), 3) if found else None

        columns = [{phase: median_of(reps, lambda r, phase=phase: {**r["seconds_by_phase"],
                                                                   **r.get("reference_by_phase", {})}.get(phase))
                    for phase in PHASE_LABELS} for reps in by_replicas]
        tables.append(_table(
            "Where a case's time goes, by phase (median seconds over the repetitions)", [f["id"] for f in cases],
            columns, [("whole case", [median_of(reps, lambda r: r["case_s"]) for reps in by_replicas]),
                      ("**outside the workload** (the figure)",
                       [median_of(reps, lambda r: r["outside_s"]) for reps in by_replicas]),
                      ("reference: bare `compose up -d` + `down` (the figure's reference)",
                       [median_of(reps, lambda r: r["bare_up_down_s"]) for reps in by_replicas])]))
    if sweeps:
        tables.append(_table(
            "Where a sweep's time goes, by phase (seconds over its cases)",
            [f"overhead.sweep.{'reuse' if d['reuse'] else 'fresh'}" for d in sweeps],
            [d["seconds_by_phase"] for d in sweeps],
            [("whole sweep (the figure)", [d["wall_s"] for d in sweeps]),
             ("**outside the workloads**", [round(d["wall_s"] - d["workload_s"], 2) for d in sweeps])]))
    return tables


def run(quick: bool, log: Log) -> dict:
    """Every overhead figure; ``quick`` uses fewer repetitions and containers."""
    build_image()
    figures, rows = [], []
    for replicas in ((1, 10) if quick else (1, 10, 50)):
        fig, timings = per_case(replicas, 1 if quick else 3, log)
        figures.append(fig)
        rows += timings
    sweeps = []
    # The quick run measures only the sweep the target is about.
    for reuse in ((True,) if quick else (False, True)):
        fig, details = sweep(reuse, log, quick=quick)
        figures.append(fig)
        sweeps.append(details)
    return {"figures": figures, "details": {"per_case": rows, "sweeps": sweeps,
                                            "breakdown": breakdown(figures, rows, sweeps)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, log_to_stderr), indent=1))
