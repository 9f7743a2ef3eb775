"""lab.py's commands: run, check, list, doctor, report, compare, link, clean.

Errors are one or two sentences and an exit code (2 bad input, 3 the engine
cannot run the lab, 1 a case failed or an expectation did not hold); a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

import socklab
from socklab.cli import ArgumentParser
from socklab.errors import EngineError, SocklabError, UsageError

from . import proc, records, report, scenario
from .compose import REPO_ROOT, ComposeProject
from .config import load_experiment
from .matrix import Case, expand_cases, expand_runs

CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_OUT = REPO_ROOT / "results"
BUILD_PROJECT = "socklab-build"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ check / list

def _load(config: str, overrides: Sequence[str]):
    path = Path(config)
    if not path.is_file():
        raise UsageError(f"{config}: no such experiment file")
    return load_experiment(path, overrides=tuple(overrides))


def _print_cases(cases: Sequence[Case]) -> None:
    total = sum(c.repetitions for c in cases)
    _say(f"{len(cases)} case(s), {total} run(s) with repetitions:")
    for case in cases:
        _say(f"  {case.index + 1:>3}. {case.id}  (x{case.repetitions})")


def _checked_cases(experiment) -> list[Case]:
    """The experiment's cases, each one a lab can run (bad input raises UsageError)."""
    cases = expand_cases(experiment)
    for case in cases:
        scenario.server_workload(case.experiment)
    return cases


def cmd_check(args) -> int:
    """Validate an experiment and print its cases."""
    experiment = _load(args.config, args.set)
    cases = _checked_cases(experiment)
    _say(f"{args.config}: experiment {experiment.name} is valid")
    _print_cases(cases)
    return 0


def cmd_list(args) -> int:
    """One line per experiment in configs/."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            experiment = load_experiment(path)
            _say(f"{experiment.name:<16} {experiment.description}")
        except UsageError as exc:
            _say(f"{path.stem:<16} (invalid: {exc})")
    return 0


# ------------------------------------------------------------------------- run

def _engine():
    from .docker_api import DockerAPI

    return DockerAPI()


def _compose_version() -> str:
    try:
        return proc.run(["docker", "compose", "version", "--short"], timeout_s=30).stdout.strip()
    except proc.CommandError:
        raise EngineError("Docker Compose v2 is missing: `docker compose version` failed; "
                          "install the Compose plugin") from None


def _git_revision() -> str | None:
    done = proc.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], check=False, timeout_s=10)
    if done.returncode != 0:
        return None
    dirty = proc.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"], check=False, timeout_s=10)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _dry_run(cases: Sequence[Case]) -> int:
    _print_cases(cases)
    for case in cases:
        _say(f"\ncase {case.id}:")
        override = scenario.compose_override(case.experiment, case.id)
        for service, spec in override["services"].items():
            _say(f"  {service}: {shlex.join(spec['command'])}")
        for service, plan in scenario.shaping_plans(case.experiment).items():
            if not plan:
                _say(f"  {service}: link unshaped")
            for argv in plan:
                _say(f"  {service}$ {shlex.join(argv)}")
    return 0


def _summary_table(case_records: Sequence[dict]) -> None:
    _say("")
    header = f"{'case':<48} {'rep':>3} {'status':<8} {'wall s':>8} {'expectations':>12}"
    _say(header)
    _say("-" * len(header))
    for r in case_records:
        held = sum(e["passed"] for e in r["expectations"])
        _say(f"{r['case'][:48]:<48} {r['repetition']:>3} {r['status']:<8} {r['wall_s']:>8.2f} "
             f"{held:>5}/{len(r['expectations']):<6}")
        for e in r["expectations"]:
            if not e["passed"]:
                _say(f"    did not hold: {e['name']}: {e['check']} "
                     f"(observed {json.dumps(e['observed'])}{'; ' + e['error'] if e.get('error') else ''})")
        if r["status"] != "ok":
            _say(f"    {r['error']}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> int:
    """Run an experiment's cases and write the run directory."""
    from .rundir import RunDir
    from .runner import CaseRunner

    overrides = list(args.set) + ([f"repeat={args.repeat}"] if args.repeat is not None else [])
    if args.resume:
        rundir = RunDir.open_existing(Path(args.resume))
        if args.config or overrides:
            raise UsageError("--resume takes the experiment from the run directory; "
                             "give neither CONFIG nor --set/--repeat with it")
        experiment = load_experiment(rundir.path / "experiment.yaml")
    else:
        if not args.config:
            raise UsageError("lab.py run: give an experiment file (CONFIG.yaml) or --resume RUN_DIR")
        experiment = _load(args.config, overrides)
    cases = _checked_cases(experiment)
    if args.dry_run:
        return _dry_run(cases)

    api = _engine()
    compose_version = _compose_version()
    if not args.resume:
        rundir = RunDir.create(Path(args.out) if args.out else DEFAULT_OUT, experiment.name)
        rundir.write_experiment(experiment.to_dict())
    _progress_line(f"run directory: {rundir.path}")
    versions = api.versions()
    meta = rundir.read_meta() or {
        "lab_version": socklab.__version__, "git_revision": _git_revision(),
        "host_kernel": versions["kernel"], "docker": versions, "compose": compose_version,
        "python": platform.python_version(), "shaping_backend": None,
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "ended_at": None,
    }
    meta["resumed_at"] = meta.get("resumed_at", []) + ([dt.datetime.now().astimezone().isoformat(
        timespec="seconds")] if args.resume else [])
    rundir.write_meta(meta)

    _progress_line("building the lab image")
    ComposeProject(BUILD_PROJECT).build("server")
    done = rundir.done()
    todo = [(c, r) for c, r in expand_runs(cases) if (c.id, r) not in done]
    total = len(expand_runs(cases))
    runner = CaseRunner(api, rundir, lambda text: None, trace=not args.no_trace, reuse=args.reuse)
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for number, (case, repetition) in enumerate(todo, start=total - len(todo) + 1):
            def progress(text: str, number=number, case=case, repetition=repetition) -> None:
                elapsed = time.monotonic() - started
                _progress_line(f"[{number}/{total} {elapsed:6.1f}s] {case.id} r{repetition}: {text}")
            runner.progress = progress
            record = runner.run(case, repetition)
            rundir.append_case(record)
            if record["link"]["backend"] not in (None, "none"):
                meta["shaping_backend"] = record["link"]["backend"]
            progress(f"{record['status']}, {record['wall_s']:.1f} s")
    except KeyboardInterrupt:
        _progress_line(f"\ninterrupted: the lab's containers are removed and the finished cases kept; "
                       f"resume with: python lab.py run --resume {rundir.path}")
        _finish(rundir, meta)
        return 1
    finally:
        runner.close()
        signal.signal(signal.SIGTERM, previous)
    _finish(rundir, meta)
    all_records = rundir.read_cases()
    _summary_table(all_records)
    _say(f"\nresults: {rundir.path}")
    return 0 if all(records.record_passed(r) for r in all_records) else 1


def _finish(rundir, meta: dict) -> None:
    meta["shaping_backend"] = meta.get("shaping_backend") or "none"
    meta["ended_at"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    rundir.write_meta(meta)
    report.write_report(rundir)


# ---------------------------------------------------------------- report/doctor

def cmd_report(args) -> int:
    """Rebuild report.md, plots/ and summary.csv from a run directory alone."""
    from .rundir import RunDir

    rundir = RunDir.open_existing(Path(args.run_dir))
    report.write_report(rundir)
    _say(f"wrote {rundir.path / 'report.md'}")
    return 0


def cmd_compare(args) -> int:
    """Put several run directories side by side: compare.md and plots in --out."""
    from . import compare

    out = Path(args.out) if args.out else compare.default_out(DEFAULT_OUT)
    path = compare.write_comparison([Path(p) for p in args.run_dirs], out)
    _say(f"wrote {path}")
    return 0


def cmd_doctor(args) -> int:
    """Check the engine and say which shaping backend will be used."""
    problems = []
    try:
        api = _engine()
        v = api.versions()
        _say(f"Docker daemon:   ok (engine {v['engine']}, API {v['api']})")
    except EngineError as exc:
        _say(f"Docker daemon:   MISSING — {exc}")
        return 3
    try:
        _say(f"Compose v2:      ok ({_compose_version()})")
    except EngineError as exc:
        _say(f"Compose v2:      MISSING — {exc}")
        return 3
    _say(f"host kernel:     {v['kernel']}")
    _say("lab image:       building (cached layers make this quick)")
    ComposeProject(BUILD_PROJECT).build("server")
    probe = ComposeProject("socklab-doctor")
    try:
        caps = json.loads(probe.run("client", "shape", "caps", "--json",
                                    env={"CLIENT_LINK_RATE": ""}).stdout)
    finally:
        probe.down()
    q = caps["qdiscs"]
    mark = {True: "yes", False: "no"}
    _say("kernel qdiscs:   " + ", ".join(f"{name} {mark[bool(ok)]}" for name, ok in q.items())
         + (" (kernel module sch_netem is missing)" if not q.get("netem") else ""))
    _say(f"ifb device:      {mark[bool(caps.get('ifb'))]};  u32 filter: {mark[bool(caps.get('u32'))]};  "
         f"mirred: {mark[bool(caps.get('mirred'))]};  NFQUEUE: {mark[bool(caps.get('nfqueue'))]}")
    _say("capabilities:    containers get NET_ADMIN only; workloads run unprivileged")
    if not (q.get("tbf") and caps.get("ifb") and caps.get("mirred")):
        problems.append("this kernel lacks tbf, ifb or mirred, which every link with a rate needs")
    if q.get("netem"):
        _say("shaping backend: netem (rate by tbf; delay, jitter and loss by sch_netem)")
    elif caps.get("nfqueue"):
        _say("shaping backend: userspace (rate by tbf; delay, jitter and loss by a delay line fed through "
             "NFQUEUE, since this kernel has no sch_netem)")
    else:
        _say("shaping backend: netem for rate only (tbf): this kernel has neither sch_netem nor NFQUEUE, so "
             "links asking for delay, jitter or loss cannot be shaped here")
    for problem in problems:
        _say(f"problem:         {problem}")
    return 3 if problems else 0


# ------------------------------------------------------------------ link/clean

def _lab_containers(api, project: str, service: str | None):
    found = [c for c in api.containers(project, service) if api.state(c).get("Running")]
    if not found:
        what = f"service {service} of " if service else ""
        raise UsageError(f"no running container of {what}lab project {project!r} "
                         "(start one with `docker compose up`, or name it with --project)")
    return found


def cmd_link(args) -> int:
    """Show or change the shaping of a running lab's containers."""
    api = _engine()
    if args.link_command == "show":
        shown = {}
        for container in _lab_containers(api, args.project, args.service):
            code, out = api.exec(container, ["python3", "-m", "socklab", "shape", "show", "--json"])
            if code != 0:
                raise SocklabError(f"reading the link of {container.name} failed: {out.strip()}")
            shown[container.name] = json.loads(out)
        if args.json:
            _say(json.dumps(shown, indent=2))
        else:
            for name, link in shown.items():
                _say(f"{name}: backend {link['backend']}, up {link['applied']['up']}, "
                     f"down {link['applied']['down']}")
        return 0
    for container in _lab_containers(api, args.project, args.service):
        code, out = api.exec(container, ["python3", "-m", "socklab", "shape", "set", *args.assignments])
        if code != 0:
            line = out.strip().splitlines()[-1] if out.strip() else f"exit status {code}"
            raise (UsageError if code == 2 else SocklabError)(f"{container.name}: {line}")
        _say(f"{container.name}: {out.strip()}")
    return 0


def cmd_clean(args) -> int:
    """Remove every container, network and volume carrying the lab's label."""
    removed = _engine().remove_labelled()
    for kind, names in removed.items():
        _say(f"removed {len(names)} {kind}" + (f": {', '.join(names)}" if names else ""))
    return 0


# ------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    """lab.py's argument parser."""
    parser = ArgumentParser(prog="lab.py", description="socklab: blocking vs non-blocking socket I/O on real links")
    parser.add_argument("--debug", action="store_true", help="log every command; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("run", help="run an experiment")
    p.add_argument("config", nargs="?")
    p.add_argument("--out", help="directory for run directories (default results/)")
    p.add_argument("--repeat", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--resume", metavar="RUN_DIR")
    p.add_argument("--no-trace", action="store_true", help="do not record socket-call traces")
    p.add_argument("--reuse", action="store_true",
                   help="keep containers between consecutive cases that have the same containers and links "
                        "(each case's roles run by docker exec; the link is applied afresh for each)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate an experiment, print its cases")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check)

    sub.add_parser("list", help="the experiments in configs/").set_defaults(func=cmd_list)
    sub.add_parser("doctor", help="check the engine and kernel").set_defaults(func=cmd_doctor)

    p = sub.add_parser("report", help="rebuild report.md and plots from a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="put 2 to 4 runs side by side (before/after)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="directory for compare.md and plots/ (default results/compare/<time>)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("link", help="show or change a running lab's links")
    p.add_argument("--project", default="socklab", help="Compose project (default socklab)")
    link_sub = p.add_subparsers(dest="link_command", required=True, parser_class=ArgumentParser)
    q = link_sub.add_parser("show")
    q.add_argument("service", nargs="?")
    q.add_argument("--json", action="store_true")
    q = link_sub.add_parser("set")
    q.add_argument("service")
    q.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_link)

    sub.add_parser("clean", help="remove everything the lab left behind").set_defaults(func=cmd_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn errors into their sentence and exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SocklabError as exc:
        if debug:
            raise
        message = str(exc)
        # The parser's own errors already begin with its name ("lab.py run: ...").
        print(message if message.startswith("lab.py") else f"lab.py: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lab.py: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`lab.py check X | head`): nothing left to say.
        sys.stdout = open(os.devnull, "w")
        return 0
