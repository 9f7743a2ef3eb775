"""A case as containers: the Compose override, every role's argv and link.

Pure functions from a resolved :class:`~labkit.config.Experiment` to what the
engine starts, so that the override saved in the run directory, the dry run and
the real run are one and the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from socklab import linkprobe, shaping
from socklab.capture import CAPTURE_PATH, ENV_CAPTURE, CaptureSettings
from socklab.shaping.commands import DEFAULT_STATE_PATH
from socklab.errors import UsageError

from .compose import COMPOSE_FILE, LAB_LABEL, READY_SERVICE, SERVER_SERVICE, nofile_ulimits
from .config import ClientGroup, Experiment, LinkConfig, Program, Workload
from .matrix import expand_cases

SERVER_PORT = 5000
# Where each client writes its trace inside its container; copied out at the end.
TRACE_PATH = "/tmp/socklab-trace.gz"
CASE_LABEL = "io.socklab.case"
# Written by the container's entrypoint once its link is shaped.
LINK_STATE_PATH = DEFAULT_STATE_PATH
# Where a role that runs a program of the user's finds it (the run directory's copy,
# mounted read-only), and where it leaves the program's whole stdout and stderr.
PROGRAMS_MOUNT = "/programs"
PROGRAM_OUTPUT_DIR = "/tmp/socklab-program"
PROGRAM_OUTPUTS = ("stdout", "stderr")
# Long enough for any case's slowest peer; short enough that a vanished peer is
# noticed within a case (the server never hangs on it).
SERVER_IDLE_TIMEOUT = "60s"

def client_service(group: ClientGroup | str) -> str:
    """The Compose service of a client group."""
    name = group if isinstance(group, str) else group.name
    return f"client-{name}"


def link_env(link: LinkConfig) -> dict[str, str]:
    """The ``SOCKLAB_LINK_*`` variables that make a container shape ``link``.

    Rendered by the container's own link model (its inverse parses them), every
    variable present (empty when unset), so nothing from the base compose file or
    the user's environment leaks into a case's link.
    """
    return shaping.env_from_changes(link.changes(), link.backend or "auto")


def link_assignments(change: LinkConfig) -> list[str]:
    """A schedule step's change as `shape set` words (``rate=1mbit``, ``up.delay=5ms``)."""
    return shaping.assignments_from_changes(change.changes())


def fill_placeholders(word: str) -> str:
    """A program's argument with ``{host}`` (the server's name) and ``{port}`` (its port) filled in."""
    return word.format(host=SERVER_SERVICE, port=SERVER_PORT)


def program_argv(program: Program, role: str, *, trace: bool = True) -> list[str]:
    """The ``program`` role's arguments that run ``program`` as the ``role`` (server or client).

    A Python file runs with the image's python3 from the read-only mount; a
    command as it is, from the image. ``trace`` False (``--no-trace``) records no
    socket calls, whatever the program's ``trace`` asks.
    """
    argv = ["program", "--role", role, "--name", program.name,
            "--trace-with", program.trace if trace else "none", "--trace", TRACE_PATH,
            "--output-dir", PROGRAM_OUTPUT_DIR]
    if role == "server":
        argv += ["--port", str(SERVER_PORT)]
    if program.command is not None:
        run = [fill_placeholders(word) for word in program.command]
    else:
        run = ["python3", f"{PROGRAMS_MOUNT}/{program.script}", *(fill_placeholders(a) for a in program.args)]
    return [*argv, "--", *run]


def role_files(program: Program | None) -> tuple[str, ...]:
    """The files a role leaves in its container for the orchestrator to collect: in a kept
    container they are removed before the next case's role starts, so that none passes for its."""
    if program is None:
        return (TRACE_PATH, CAPTURE_PATH)
    return (TRACE_PATH, CAPTURE_PATH, *(f"{PROGRAM_OUTPUT_DIR}/{stream}" for stream in PROGRAM_OUTPUTS))


def capture_env(settings: CaptureSettings | None) -> dict[str, str]:
    """The variable that makes a container's entrypoint capture its packets (empty: none)."""
    return {ENV_CAPTURE: settings.to_env() if settings is not None else ""}


def probe_env(experiment: Experiment, group: ClientGroup | None) -> dict[str, str]:
    """The variables of the link probe: the server answers probes, a client probes its path
    before its workload when a link on that path is shaped (``verify: off``: neither)."""
    if group is None:
        return {linkprobe.ENV_PROBE_RESPOND: "" if experiment.verify == "off" else str(SERVER_PORT)}
    shaped = group.link.is_shaped or experiment.server.link.is_shaped
    probing = experiment.verify != "off" and shaped
    return {linkprobe.ENV_PROBE: f"{SERVER_SERVICE}:{SERVER_PORT}" if probing else "",
            linkprobe.ENV_PROBE_GROUP: group.name}


def program_files(experiment: Experiment) -> list[str]:
    """The files and directories (relative to the program root) of every program any case of
    ``experiment`` runs, matrix values included, in order and once each."""
    found: list[str] = []
    for case in expand_cases(experiment):
        for program in case.experiment.programs:
            if program.path is not None and program.path not in found:
                found.append(program.path)
    return found


def server_workload(experiment: Experiment) -> str:
    """What the server does with bytes: echo them (when a group wants echoes) or count them.

    Slow and connect peers work against either; a bulk sender cannot share an
    echo server, since it never reads the echo of what it sends and both would stall.
    """
    kinds = {group.workload.kind for group in experiment.clients if group.program is None}
    if "echo" not in kinds:
        return "bulk"
    if "bulk" in kinds:
        raise UsageError(
            f"experiment {experiment.name}: echo and bulk client groups cannot share one server "
            "in a case: the server would echo the bulk payload to a client that never reads it")
    return "echo"


def server_argv(experiment: Experiment) -> list[str]:
    """The server role's arguments (it runs until the orchestrator stops it)."""
    server = experiment.server
    if server.program is not None:
        return program_argv(server.program, "server")
    argv = ["server", "--mode", server.mode, "--port", str(SERVER_PORT),
            "--recv-size", str(server.recv_size_bytes), "--workload", server_workload(experiment),
            "--idle-timeout", SERVER_IDLE_TIMEOUT]
    if server.rcvbuf_bytes is not None:
        argv += ["--rcvbuf", str(server.rcvbuf_bytes)]
    return argv


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:g}s"


def _workload_args(workload: Workload) -> list[str]:
    options = {
        "bulk": [("--bytes", workload.bytes), ("--pattern", workload.pattern),
                 ("--chunk", workload.chunk_bytes)],
        "echo": [("--requests", workload.requests), ("--size", workload.size_bytes),
                 ("--think", _seconds(workload.think_s))],
        "connect": [("--attempts", workload.attempts), ("--cancel-after", _seconds(workload.cancel_after_s)),
                    ("--connect-timeout", _seconds(workload.connect_timeout_s))],
        "slow": [("--rate", workload.rate_bytes_per_s), ("--hold", _seconds(workload.hold_s))],
    }[workload.kind]
    args = []
    for flag, value in options:
        if value is not None:
            args += [flag, str(value)]
    return args


def client_argv(group: ClientGroup, *, trace: bool = True, lab_server: bool = True) -> list[str]:
    """A client group's role arguments (``lab_server`` False: the server is a program of the
    user's, which owes the client no trailer)."""
    if group.program is not None:
        return program_argv(group.program, "client", trace=trace)
    argv = ["client", "--mode", group.mode, "--host", SERVER_SERVICE, "--port", str(SERVER_PORT),
            "--workload", group.workload.kind, "--connections", str(group.connections),
            *_workload_args(group.workload)]
    for flag, value in (("--sndbuf", group.sndbuf_bytes), ("--rcvbuf", group.rcvbuf_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    if group.mode == "timeout":
        argv += ["--timeout", _seconds(group.socket_timeout_s)]
    if not lab_server:
        argv += ["--no-trailer"]
    if trace:
        argv += ["--trace", TRACE_PATH]
    return argv


def compose_override(experiment: Experiment, case_id: str, *, trace: bool = True,
                     owner: Mapping[str, str] | None = None, programs_dir: Path | None = None,
                     nofile: int | None = None) -> dict[str, Any]:
    """The Compose override file that turns compose.yaml into this case's lab.

    ``owner``: labels naming the run that owns the objects (see labkit.owner);
    they go on every container, network and volume, so that `lab.py clean`
    leaves a live run's objects alone. ``programs_dir``: the directory mounted
    read-only where a role runs a program of the user's (the run directory's
    copy; the experiment's own program root when not given, as in a dry run).
    ``nofile``: the descriptors every role's container is given, soft and hard
    (what the engine allows, see DockerAPI.nofile_allowed); the engine's default
    when not given.
    """
    def labels() -> dict[str, str]:
        return {LAB_LABEL: "true", CASE_LABEL: case_id}

    def mounts(program: Program | None) -> dict[str, Any]:
        if program is None or program.path is None:
            return {}
        source = programs_dir if programs_dir is not None else experiment.program_dir
        return {"volumes": [{"type": "bind", "source": str(source), "target": PROGRAMS_MOUNT, "read_only": True}]}

    limits = nofile_ulimits(nofile) if nofile is not None else {}
    services: dict[str, Any] = {
        SERVER_SERVICE: {
            "command": server_argv(experiment),
            "environment": {**link_env(experiment.server.link), "SOCKLAB_RESULT_DIR": "",
                            "SOCKLAB_RESULT_RESET": "0", "SOCKLAB_REPORT_LINK": "1",
                            **capture_env(experiment.capture_of(experiment.server)), **probe_env(experiment, None)},
            "labels": labels(),
            **placement(experiment.server.placement),
            **mounts(experiment.server.program),
            **limits,
        },
        READY_SERVICE: {"labels": labels()},
    }
    for group in experiment.clients:
        services[client_service(group)] = {
            "extends": {"file": str(COMPOSE_FILE), "service": "client"},
            "command": client_argv(group, trace=trace, lab_server=experiment.server.program is None),
            "environment": {**link_env(group.link), "SOCKLAB_RESULT_DIR": "",
                            "SOCKLAB_REPORT_LINK": "1", **capture_env(experiment.capture_of(group)),
                            **probe_env(experiment, group)},
            "labels": labels(),
            "depends_on": {READY_SERVICE: {"condition": "service_completed_successfully"}},
            "deploy": {"replicas": group.replicas, **placement(group.placement).get("deploy", {})},
            **mounts(group.program),
            **limits,
        }
    return owned({"services": services}, owner)


def placement(constraints: tuple[str, ...] | None) -> dict[str, Any]:
    """A service's Compose keys for Swarm placement ``constraints`` (none when they are unset)."""
    return {"deploy": {"placement": {"constraints": list(constraints)}}} if constraints else {}


def owned(definition: dict[str, Any], owner: Mapping[str, str] | None) -> dict[str, Any]:
    """``definition`` (a Compose override: ``{"services": ...}``) with ``owner``'s labels on
    every service, the lab network and the results volume (see labkit.owner), so that
    `lab.py clean` leaves a live run's objects alone; unchanged without an owner."""
    if not owner:
        return definition
    services = {name: {**service, "labels": {**service.get("labels", {}), **owner}}
                for name, service in definition["services"].items()}
    # compose.yaml labels the network and volume as the lab's already; Compose
    # concatenates a volume's labels, and would refuse that one twice.
    return {**definition, "services": services, "networks": {"lab": {"labels": dict(owner)}},
            "volumes": {"results": {"labels": dict(owner)}}}


def client_services(experiment: Experiment) -> list[str]:
    """The Compose services of the experiment's client groups, in order."""
    return [client_service(g) for g in experiment.clients]


def containers_key(override: dict[str, Any]) -> dict[str, Any]:
    """What a case's containers are made of: its override without the roles' arguments and case label.

    Two cases with equal keys can run in the same kept containers.
    """
    key = {}
    for name, service in override["services"].items():
        key[name] = {k: v for k, v in service.items() if k not in ("command", "labels")}
    return key


def kept_override(override: dict[str, Any]) -> dict[str, Any]:
    """The override for containers kept between cases: each runs ``entry hold``; roles come by exec.

    No server role listens while they start, so the gate (READY_SERVICE) is
    left out and the clients wait only for the server's container; the runner
    starts each case's server role and waits for it to listen.
    """
    services = {}
    for name, service in override["services"].items():
        if name == READY_SERVICE:
            continue
        kept = {**service, "command": ["hold"]}
        if name != SERVER_SERVICE:
            kept["depends_on"] = {SERVER_SERVICE: {"condition": "service_started"}}
        services[name] = kept
    return {"services": services}


def shaping_plans(experiment: Experiment) -> dict[str, list[list[str]]]:
    """Every tc/ip command each service's containers would run, for a dry run.

    Built by the functions the containers use, from each link as the loader
    resolved (and validated) it; the backend is what the link asks for ('auto' is
    shown as netem, the kernel qdisc it prefers — the real choice is made by
    probing the kernel).
    """
    links = {SERVER_SERVICE: experiment.server.link}
    links.update({client_service(g): g.link for g in experiment.clients})
    plans = {}
    for service, link in links.items():
        spec = link.spec
        backend = link.backend or "auto"
        plans[service] = shaping.build_plan(spec, "netem" if backend == "auto" else backend) if spec.shaped else []
    return plans
