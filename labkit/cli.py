"""lab.py's command line: parse, dispatch to a command of labkit.commands, map errors to exit codes.

    run      labkit/commands/run.py       an experiment's cases on the engine
    try      labkit/commands/trial.py     a program of the user's on a shaped link, no YAML
    check    labkit/commands/check.py     validate an experiment (and list: configs/)
    doctor   labkit/commands/doctor.py    every check of the engine, image and kernel
    report   labkit/commands/report.py    rebuild a run's report (and compare: runs side by side)
    link     labkit/commands/link.py      show, change or verify a running lab's links
    capture  labkit/commands/capture.py   a running lab's packets, live, as pcap
    clean    labkit/commands/clean.py     remove what ended runs left behind

Errors are one or two sentences and an exit code (2 bad input, 3 the engine
cannot run the lab, 1 a case failed or an expectation did not hold, 130
interrupted); a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from socklab.cli import ArgumentParser
from socklab.errors import SocklabError

from .commands.capture import cmd_capture
from .commands.check import cmd_check, cmd_list
from .commands.clean import cmd_clean
from .commands.doctor import cmd_doctor
from .commands.link import cmd_link
from .commands.report import cmd_compare, cmd_report
from .commands.run import INTERRUPTED_EXIT, cmd_run
from .commands.trial import cmd_try
from .config import SERVER_MODES
from .engine import ENGINES

# ------------------------------------------------------------------------ main

def _engine_options(parser: argparse.ArgumentParser, *, image: bool = False) -> None:
    """--engine (and --image, for commands that start tasks) of the commands that reach an engine."""
    parser.add_argument("--engine", choices=ENGINES, default="compose",
                        help="compose (one host, the default) or swarm (the swarm the Docker client reaches)")
    if image:
        parser.add_argument("--image", metavar="REF",
                            help="with --engine swarm: the image every node runs (default: the lab image "
                                 "the Compose build makes; or SOCKLAB_IMAGE)")


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
    p.add_argument("--capture", action="store_true",
                   help="a pcap of every container's packets under captures/ (as `capture: true` in the file)")
    p.add_argument("--no-plots", action="store_true",
                   help="write report.md without plots (`lab.py report RUN_DIR` draws them later)")
    p.add_argument("--reuse", action="store_true",
                   help="keep containers between consecutive cases that have the same containers and links "
                        "(each case's roles run by docker exec; the link is applied afresh for each)")
    _engine_options(p, image=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("try", help="run a program of yours against a server on a shaped link (no YAML)")
    p.add_argument("program", metavar="PROGRAM.py")
    server = p.add_mutually_exclusive_group()
    server.add_argument("--server", metavar="SERVER.py", help="a server program of yours (arguments: {port})")
    server.add_argument("--server-mode", choices=SERVER_MODES, help="a built-in server (default blocking)")
    p.add_argument("--link", metavar="KEY=VALUE,...", help="the program's link, e.g. rate=10mbit,delay=20ms "
                                                          "(up.KEY, down.KEY for one direction)")
    p.add_argument("--timeout", default="120s", help="bound on the run (default 120s)")
    p.add_argument("--capture", action="store_true", help="a pcap of the program's and the server's packets")
    p.add_argument("--out", help="directory for run directories (default results/)")
    p.add_argument("args", nargs="*", metavar="-- ARGS",
                   help="the program's arguments ({host} and {port} filled in; default: {host} {port})")
    p.set_defaults(func=cmd_try)

    p = sub.add_parser("check", help="validate an experiment, print its cases")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check)

    sub.add_parser("list", help="the experiments in configs/").set_defaults(func=cmd_list)
    p = sub.add_parser("doctor", help="check the engine and kernel")
    _engine_options(p, image=True)
    p.set_defaults(func=cmd_doctor)

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
    q = link_sub.add_parser("verify", help="measure each client's path to the server against its configuration")
    q.add_argument("service", nargs="?")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("capture", help="a running lab's packets as pcap, live (| wireshark -k -i -)")
    p.add_argument("service", help="the service whose container's eth0 to capture (e.g. client-blocking)")
    p.add_argument("-w", "--write", metavar="FILE", help="write the pcap to FILE (default: stdout)")
    p.add_argument("--replica", type=int, default=1, help="which of the service's containers (default 1)")
    p.add_argument("-c", "--count", type=int, help="stop after this many packets")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this many seconds")
    p.add_argument("--project", default="socklab", help="Compose project (default socklab)")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("clean", help="remove what the lab left behind (never a live run's objects)")
    p.add_argument("--force", action="store_true", help="remove the objects of runs still going too")
    _engine_options(p)
    p.set_defaults(func=cmd_clean)
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
        return INTERRUPTED_EXIT
    except BrokenPipeError:
        # The reader went away (`lab.py check X | head`): nothing left to say.
        sys.stdout = open(os.devnull, "w")
        return 0
