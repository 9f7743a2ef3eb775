"""`lab.py run`: an experiment's cases on the engine, into a run directory.

An interrupt (SIGINT, or SIGTERM) stops the run between two engine calls: the
lab's containers are taken down, the finished cases are kept, the report is
written from them, and lab.py says how to resume and exits 130. A second
signal during that teardown does not cut it short.
"""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path
from typing import Sequence

from socklab.errors import UsageError

from .. import engine as engines
from .. import linkcheck, owner, proc, records, scenario
from ..compose import REPO_ROOT
from ..matrix import Case, expand_runs
from .common import DEFAULT_OUT, checked_cases, load, print_cases, progress_line, say

INTERRUPTED_EXIT = 130  # the shell's convention for SIGINT


def _git_revision() -> str | None:
    """The checkout's revision (``+dirty`` with local changes); None outside git or without it."""
    try:
        done = proc.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], check=False, timeout_s=10)
    except proc.CommandError:
        return None  # git is not installed: the revision is unknown, which meta.json can say
    if done.returncode != 0:
        return None
    dirty = proc.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], check=False, timeout_s=10)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _dry_run(cases: Sequence[Case]) -> int:
    print_cases(cases)
    for case in cases:
        say(f"\ncase {case.id}:")
        override = scenario.compose_override(case.experiment, case.id)
        for service, spec in override["services"].items():
            # The gate (server-ready) runs as compose.yaml defines it; the case changes only its labels.
            say(f"  {service}: {shlex.join(spec['command']) if 'command' in spec else 'as compose.yaml defines it'}")
            if "placement" in spec.get("deploy", {}):
                say(f"  {service}: on a swarm, placed by {' and '.join(spec['deploy']['placement']['constraints'])}")
        for service, plan in scenario.shaping_plans(case.experiment).items():
            if not plan:
                say(f"  {service}: link unshaped")
            for argv in plan:
                say(f"  {service}$ {shlex.join(argv)}")
    return 0


def _summary_table(case_records: Sequence[dict]) -> None:
    say("")
    header = f"{'case':<48} {'rep':>3} {'status':<8} {'wall s':>8} {'expectations':>12} {'link':>6}"
    say(header)
    say("-" * len(header))
    for r in case_records:
        held = sum(e["passed"] for e in r["expectations"])
        # Measured against configured (see labkit.linkcheck): "-" where no link was shaped or verify is off.
        link = {True: "ok", False: "OFF", None: "?"}[r["link_ok"]] if "link_ok" in r else "-"
        say(f"{r['case'][:48]:<48} {r['repetition']:>3} {r['status']:<8} {r['wall_s']:>8.2f} "
            f"{held:>5}/{len(r['expectations']):<6} {link:>6}")
        for key, verdict in sorted(((r.get("link") or {}).get("measured") or {}).items()):
            if verdict.get("ok") is not True:
                say(f"    link of {key}: {linkcheck.verdict_text(verdict)}")
        for e in r["expectations"]:
            if not e["passed"]:
                say(f"    did not hold: {e['name']}: {e['check']} "
                    f"(observed {json.dumps(e['observed'])}{'; ' + e['error'] if e.get('error') else ''})")
        if r["status"] != "ok":
            say(f"    {r['error']}")


class Interrupts:
    """SIGINT and SIGTERM while a run runs: the first raises KeyboardInterrupt, later ones wait for the teardown."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            raise KeyboardInterrupt
        progress_line("lab.py: still tearing the lab down; it takes a few seconds")

    def __enter__(self) -> "Interrupts":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def cmd_run(args) -> int:
    """Run an experiment's cases and write the run directory."""
    from ..rundir import RunDir

    overrides = list(args.set) + ([f"repeat={args.repeat}"] if args.repeat is not None else []) \
        + (["capture=true"] if args.capture else [])
    rundir = None
    if args.resume:
        rundir = RunDir.open_existing(Path(args.resume))
        if args.config or overrides:
            raise UsageError("--resume takes the experiment from the run directory; "
                             "give neither CONFIG nor --set/--repeat with it")
        from ..config import load_experiment

        experiment = load_experiment(rundir.path / "experiment.yaml")
    else:
        if not args.config:
            raise UsageError("lab.py run: give an experiment file (CONFIG.yaml) or --resume RUN_DIR")
        experiment = load(args.config, overrides)
    cases = checked_cases(experiment)
    if args.dry_run:
        return _dry_run(cases)

    rundir, interrupted = execute(
        experiment, cases, engine_name=args.engine, image=args.image,
        out_root=Path(args.out) if args.out else DEFAULT_OUT,
        resume=rundir, trace=not args.no_trace, reuse=args.reuse, draw=not args.no_plots)
    if interrupted:
        return INTERRUPTED_EXIT
    all_records = rundir.read_cases()
    _summary_table(all_records)
    say(f"\nresults: {rundir.path}")
    return 0 if all(records.record_passed(r) for r in all_records) else 1


def execute(experiment, cases: Sequence[Case], *, engine_name: str, image: str | None, out_root: Path,
            resume=None, trace: bool = True, reuse: bool = False, draw: bool = True):
    """Run ``cases`` (those not yet recorded in ``resume``, a RunDir, or all in a new run
    directory under ``out_root``) and write the report; the RunDir and, if a signal
    interrupted the run, its name (the lab is down by then, and what finished is kept)."""
    from ..rundir import new_meta
    from ..runner import CaseRunner

    with Interrupts() as interrupts:
        engine = engines.open_engine(engine_name, image=image)
        versions = engine.versions()  # the engine is reachable before a run directory is made
        rundir = resume if resume is not None else new_rundir(experiment, out_root)
        progress_line(f"run directory: {rundir.path}")
        rundir.begin(new_meta(git_revision=_git_revision(), versions=versions), resumed=resume is not None)

        progress_line("building the lab image")
        engine.build_image()
        done = rundir.done()
        total = len(expand_runs(cases))
        todo = [(c, r) for c, r in expand_runs(cases) if (c.id, r) not in done]
        runner = CaseRunner(engine, rundir, lambda text: None, trace=trace, reuse=reuse,
                            owner=owner.current_owner().labels())
        started = time.monotonic()
        interrupted = None
        try:
            for number, (case, repetition) in enumerate(todo, start=total - len(todo) + 1):
                def progress(text: str, number=number, case=case, repetition=repetition) -> None:
                    elapsed = time.monotonic() - started
                    progress_line(f"[{number}/{total} {elapsed:6.1f}s] {case.id} r{repetition}: {text}")
                runner.progress = progress
                record = runner.run(case, repetition)
                rundir.append_case(record)
                progress(f"{record['status']}, {record['wall_s']:.1f} s")
        except KeyboardInterrupt:  # told below, once the lab is down
            interrupted = interrupts.received or "SIGINT"
        finally:
            runner.close()
    _finish(rundir, draw=draw)
    if interrupted:
        progress_line(f"\ninterrupted by {interrupted}: the lab's containers are removed and the finished "
                      f"cases kept; resume with: python lab.py run --resume {rundir.path}")
    return rundir, interrupted


def new_rundir(experiment, out_root: Path):
    """A new run directory for ``experiment``: its programs copied in, its resolved experiment
    written (with program_root pointing at the copies, so the directory alone reruns it)."""
    from ..rundir import PROGRAMS_DIR, RunDir

    rundir = RunDir.create(out_root, experiment.name)
    resolved = experiment.to_dict()
    programs = scenario.program_files(experiment)
    if programs:
        rundir.keep_programs(experiment.program_dir, programs)
        resolved["program_root"] = PROGRAMS_DIR
    rundir.write_experiment(resolved)
    return rundir


def _finish(rundir, draw: bool) -> None:
    from .. import report

    rundir.finish()
    report.write_report(rundir, draw=draw)
