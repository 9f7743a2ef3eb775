"""`python -m socklab shape`: apply, set, show, teardown and caps of a container's link."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..cli import ArgumentParser
from ..errors import EngineError, UsageError
from . import delayline
from .backends import get_backend
from .caps import probe_capabilities
from .commands import (DEFAULT_DEV, DEFAULT_IFB, DEFAULT_STATE_PATH, DELAYLINE_LOG, _check_ifname, apply_spec,
                       changing, set_link, show_link, state_path_from)
from .model import (ENV_DEV, ENV_IFB, ENV_STATE, LinkChanges, LinkSpec, backend_from_env, changes_from_assignments, changes_from_env,
                    parse_seed, seed_from_env)
from .runner import Runner, run

log = logging.getLogger("socklab.shaping")


def _parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument("--dev", help=f"the container's link device (default {DEFAULT_DEV}, or the applied one)")
    common.add_argument("--ifb", help=f"the ifb device for the down direction (default {DEFAULT_IFB})")
    common.add_argument("--state", help=f"state file (default ${ENV_STATE} or {DEFAULT_STATE_PATH})")
    common.add_argument("-v", "--verbose", action="store_true", help="log every command to stderr")

    parser = ArgumentParser(prog="socklab shape", description="Shape this container's link with tc.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{apply,set,show,caps,plan,delayline}")
    keys_help = ("rate=10mbit delay=20ms jitter=5ms loss=0.1%% limit=1000, up.KEY=.. down.KEY=.., "
                 "backend=auto|netem|userspace")

    apply = sub.add_parser("apply", parents=[common], help="shape the link from scratch")
    apply.add_argument("--from-env", action="store_true", help="start from the SOCKLAB_LINK_* variables")
    apply.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help=keys_help)

    set_ = sub.add_parser("set", parents=[common], help="change the applied link")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE", help=keys_help)

    show = sub.add_parser("show", parents=[common], help="the applied link and the kernel's qdiscs")
    show.add_argument("--json", action="store_true")

    caps = sub.add_parser("caps", parents=[common], help="probe what this kernel can shape with")
    caps.add_argument("--json", action="store_true")

    plan = sub.add_parser("plan", parents=[common], help="print the commands apply would run, run nothing")
    plan.add_argument("--from-env", action="store_true", help="start from the SOCKLAB_LINK_* variables")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help=keys_help)

    line = sub.add_parser("delayline", parents=[common],
                          help="the userspace backend's delay line (apply and set run this for you)")
    line.add_argument("action", choices=["start", "set", "stats", "stop"])
    config_help = "delay_ms=N,jitter_ms=N,loss_pct=N,limit_pkts=N"
    line.add_argument("--up", metavar="CONFIG", help=f"the up direction's work: {config_help}")
    line.add_argument("--down", metavar="CONFIG", help=f"the down direction's work: {config_help}")
    line.add_argument("--seed", metavar="N", help="start: seed the loss and jitter draws (default: unseeded)")
    return parser


def _delay_line_command(args: Any, state_path: Path) -> None:
    """`shape delayline ACTION`: what the userspace plans run; prints JSON (or a line for start)."""
    configs = {d: delayline.LineConfig.from_word(w) for d, w in (("up", args.up), ("down", args.down)) if w}
    if args.action in ("start", "set") and not configs:
        raise UsageError(f"shape delayline {args.action} needs --up or --down")
    if args.seed is not None and args.action != "start":
        raise UsageError(f"shape delayline {args.action}: --seed is fixed when the delay line starts, "
                         "so it goes with start only")
    if args.action == "start":
        seed = parse_seed(args.seed, "--seed") if args.seed is not None else None
        pid = delayline.start(configs, state_path.with_name(DELAYLINE_LOG), seed)
        work = ", ".join(f"{d} {c.to_word()}" for d, c in configs.items())
        print(f"delay line running (pid {pid}): {work}")
    elif args.action == "set":
        answer = delayline.ask({"op": "set", "lines": {d: vars(c) for d, c in configs.items()}})
        if answer is None:
            raise EngineError("no delay line is running in this container to change")
        print(json.dumps(answer))
    elif args.action == "stats":
        print(json.dumps(delayline.ask({"op": "stats"})))
    else:
        print(json.dumps(delayline.stop()))


def _wanted(args: Any, environ: Mapping[str, str]) -> tuple[LinkSpec, str, str, str, int | None]:
    """(spec, backend, dev, ifb, seed) for apply/plan: environment first, then KEY=VALUE on top."""
    words, backend = changes_from_assignments(args.assignments)
    changes = LinkChanges()
    env_backend = "auto"
    seed = None
    if args.from_env:
        changes = changes_from_env(environ)
        env_backend = backend_from_env(environ)
        seed = seed_from_env(environ)
    spec = changes.overlay(words).resolve()
    dev = args.dev or (args.from_env and environ.get(ENV_DEV, "").strip()) or DEFAULT_DEV
    ifb = args.ifb or (args.from_env and environ.get(ENV_IFB, "").strip()) or DEFAULT_IFB
    return spec, backend or env_backend, dev, ifb, seed


def _print_qdiscs(shown: Mapping[str, Any]) -> None:
    print(f"backend {shown['backend']}")
    spec = LinkSpec.from_dict(shown["applied"])
    print(f"applied {spec.describe()}")
    for dev, qdiscs in shown["qdisc"].items():
        for q in qdiscs:
            print(
                f"{dev}: {q['kind']} {q['handle']} parent {q['parent']}: {q['bytes']} bytes "
                f"{q['packets']} packets, {q['drops']} dropped, {q['overlimits']} overlimits, "
                f"backlog {q['backlog']} bytes {q['qlen']} packets"
            )
    line = shown.get("delay_line")
    if line is not None and not line.get("running"):
        print(f"delay line: not running ({line.get('error', 'stopped')})")
    for direction in ("up", "down"):
        if line and direction in line:
            d = line[direction]
            late = "" if d["late_ms_mean"] is None else (
                f", released late by {d['late_ms_mean']} ms on average and {d['late_ms_max']} ms at most")
            print(
                f"delay line {direction}: {d['packets']} packets, {d['delayed']} delayed, {d['lost']} lost, "
                f"{d['overflow']} overflowed (limit {d['limit_pkts']}), {d['held']} held now{late}"
            )


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None, runner: Runner = run) -> int:
    """`python -m socklab shape SUBCOMMAND ...`; returns the exit code."""
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(list(argv))
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("socklab shape: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    state_path = state_path_from(environ, args.state)

    if args.command == "apply":
        spec, backend, dev, ifb, seed = _wanted(args, environ)
        with changing(state_path):
            print(apply_spec(spec, backend, runner=runner, dev=dev, ifb=ifb, state_path=state_path,
                             seed=seed)["summary"])
    elif args.command == "set":
        changes, backend = changes_from_assignments(args.assignments)
        with changing(state_path):
            result = set_link(changes, backend, runner=runner, dev=args.dev, ifb=args.ifb, state_path=state_path)
        print(result["summary"])
    elif args.command == "show":
        shown = show_link(runner, dev=args.dev, ifb=args.ifb, state_path=state_path)
        if args.json:
            print(json.dumps(shown))
        else:
            _print_qdiscs(shown)
    elif args.command == "delayline":
        _delay_line_command(args, state_path)
    elif args.command == "caps":
        found = probe_capabilities(runner)
        print(json.dumps(found.to_dict()) if args.json else found.describe())
    else:
        spec, backend, dev, ifb, seed = _wanted(args, environ)
        commands = get_backend(backend).plan(spec, _check_ifname(dev, "device"), _check_ifname(ifb, "ifb device"),
                                             seed)
        if args.json:
            print(json.dumps(commands))
        elif not commands:
            print(f"# {dev} unshaped: nothing to run")
        else:
            for command in commands:
                print(shlex.join(command))
    return 0
