"""`lab.py try`: a program of the user's against a server on a shaped link, with no YAML.

    python lab.py try PROGRAM.py [--server SERVER.py | --server-mode MODE]
                      [--link rate=10mbit,delay=20ms] [--timeout 120s] [--out DIR] [-- ARGS ...]

The command line becomes a one-case experiment (the same loader, runner and run
directory as `lab.py run`); the program's arguments default to ``{host} {port}``
and a server program's to ``{port}``. It prints what the program's socket calls
did beside what the server received, in the demonstration's side-by-side style,
and where the run directory, the trace and the send-call timeline are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from socklab.errors import UsageError
from socklab.summary import render

from .. import records
from ..config import ConfigError, load_experiment_text
from ..config.experiment import Experiment
from .common import DEFAULT_OUT, checked_cases, say
from .run import INTERRUPTED_EXIT, execute

EXPERIMENT_NAME = "try"
CLIENT_GROUP = "program"
# Where the one-case experiment comes from, in its error messages.
SOURCE = "<lab.py try>"


def link_mapping(text: str) -> dict[str, Any]:
    """``--link rate=10mbit,delay=20ms,up.rate=1mbit`` as a link mapping (values checked by the loader)."""
    link: dict[str, Any] = {}
    for word in (w.strip() for w in text.split(",")):
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--link {text}: {word!r} is not KEY=VALUE: use e.g. rate=10mbit,delay=20ms "
                             "(up.KEY and down.KEY for one direction)")
        direction, dot, name = key.partition(".")
        if dot:
            link.setdefault(direction, {})[name] = value
        else:
            link[key] = value
    return link


def _program(path: Path, root: Path, args: Sequence[str]) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "args": list(args)}


def try_experiment(program: Path, args: Sequence[str] | None, *, server: Path | None = None,
                   server_mode: str | None = None, link: str | None = None, timeout: str = "120s",
                   capture: bool = False) -> Experiment:
    """The one-case experiment ``lab.py try`` runs, loaded like any experiment file.

    Programs' paths are given relative to the directory that holds them all (the
    experiment's ``program_root``), so the run directory copies only those files.
    """
    for path, what in ((program, "PROGRAM"), (server, "--server")):
        if path is not None and not path.is_file():
            raise UsageError(f"lab.py try: {what} {path}: there is no such file")
    files = [program.resolve()] + ([server.resolve()] if server is not None else [])
    root = files[0].parent
    for file in files[1:]:
        while root not in file.parents:
            root = root.parent
    client: dict[str, Any] = {"name": CLIENT_GROUP,
                              "program": _program(files[0], root, ["{host}", "{port}"] if args is None else args)}
    if link:
        client["link"] = link_mapping(link)
    if server is not None:
        server_part: dict[str, Any] = {"program": _program(files[1], root, ["{port}"])}
    else:
        server_part = {"mode": server_mode or "blocking"}
    tree = {"name": EXPERIMENT_NAME, "description": f"lab.py try {program.name}", "timeout": timeout,
            "program_root": str(root), "server": server_part, "clients": [client]}
    if capture:
        tree["capture"] = True
    try:
        return load_experiment_text(yaml.safe_dump(tree, sort_keys=False), SOURCE)
    except ConfigError as exc:
        # The generated file's lines mean nothing to the user: name the option instead.
        reason = str(exc).split(": ", 2)[-1]
        option = {"timeout": "--timeout", "clients[0].link": f"--link {link}"}
        named = next((o for k, o in option.items() if (exc.key or "").startswith(k)), "lab.py try")
        raise UsageError(f"lab.py try: {named}: {reason}") from None


def side_by_side(record: dict[str, Any]) -> str:
    """What the program's socket calls did beside what the server received (the demo's layout)."""
    clients = {f"{c['name']}" if c["replica"] == 0 else f"{c['name']}#{c['replica']}": c for c in record["clients"]}
    title = f"socklab try: {', '.join(c.get('mode') or '?' for c in clients.values())} ({record['status']})"
    return render(clients, record.get("server"), title=title)


def role_lines(who: str, result: dict[str, Any]) -> str:
    """A program role's calls by name, how long its network outlived it, and what it printed."""
    program = result.get("program") or {}
    lines = []
    calls = program.get("calls") or {}
    if calls:
        lines.append(f"{who}'s socket calls: " + ", ".join(f"{name} {count:,}" for name, count in calls.items()))
    drain = result.get("drain") or {}
    if drain.get("s"):
        left = "everything sent" if drain.get("complete") else f"{drain.get('unsent_bytes'):,} bytes still unsent"
        lines.append(f"after {who} exited, its network stayed up {drain['s']:.3f} s for the kernel to deliver "
                     f"what its sockets held ({left})")
    if program.get("stdout_tail"):
        lines.append(f"{who} printed:\n  " + "\n  ".join(program["stdout_tail"].rstrip().splitlines()))
    return "\n".join(lines)


def cmd_try(args) -> int:
    """Run a program against a server on a shaped link; print what its socket calls did."""
    if args.server and args.server_mode:
        raise UsageError("lab.py try: give --server SERVER.py or --server-mode MODE, not both")
    experiment = try_experiment(Path(args.program), args.args if args.args else None,
                                server=Path(args.server) if args.server else None, server_mode=args.server_mode,
                                link=args.link, timeout=args.timeout, capture=args.capture)
    cases = checked_cases(experiment)
    rundir, interrupted = execute(experiment, cases, engine_name="compose", image=None,
                                  out_root=Path(args.out) if args.out else DEFAULT_OUT)
    if interrupted:
        return INTERRUPTED_EXIT
    (record,) = rundir.read_cases()
    say(side_by_side(record))
    for client in record["clients"]:
        say(role_lines(client.get("mode") or client["name"], client))
    if (record.get("server") or {}).get("program"):
        say(role_lines("the server", record["server"]))
    if record["status"] != "ok":
        say(f"\nthe case {record['status']}: {record['error']}")
    say(f"\nrun directory: {rundir.path}")
    for client in record["clients"]:
        if client.get("trace"):
            say(f"socket calls of {client['name']}: {rundir.path / client['trace']}")
    for role in (*record["clients"], record.get("server") or {}):
        if (role.get("capture") or {}).get("file"):
            say(f"packets of {role.get('name', 'the server')}: {rundir.path / role['capture']['file']}")
    timeline = rundir.path / "plots" / "send-timeline.png"
    if timeline.is_file():
        say(f"send-call timeline: {timeline}")
    return 0 if records.record_passed(record) else 1

